"""README's "Running the int8 model" snippets, run as a user would: each in a fresh Python
process, on files the xnnpack backend wrote, with every deprecation turned into an error and no
word of deprecation on stderr (torch's C++ deprecation notices are printed, not raised). The one
that passes is Python's importlib.resources deprecating read_text / open_text, which
ExecuTorch's runtime calls while it imports: not a PyTorch API on this path. (ExecuTorch's
runtime also marks itself experimental on import, with an ExperimentalWarning that it derives
from DeprecationWarning: let pass too.)"""
import re
import subprocess
import sys

import pytest
import torch

import quant
from tests.e2e_helpers import REPO, SAMPLE_CLIENTS, load_user_model

# torch's log line when torchao (imported by ExecuTorch and by the .pt2 snippet) registers an
# enum with pytree: a notice to torchao's developers, not an API these snippets call.
KNOWN_LIBRARY_NOTICE = "calling register_constant() on enum subclasses is deprecated"
SNIPPET = re.compile(r"<!-- snippet: (\w+) -->\s*```python\n(.*?)```", re.DOTALL)
DEPRECATIONS_ARE_ERRORS = ["-W", "error::DeprecationWarning", "-W", "error::PendingDeprecationWarning",
                           "-W", "error::FutureWarning"]
# importlib.resources' legacy read_text / open_text, which ExecuTorch's runtime calls on import
# (-W takes a literal message start, not a pattern: one option each; later options win)
# and ExecuTorch's "experimental" notice, which it derives from DeprecationWarning to be filtered
# like one (executorch/exir/_warnings.py)
ALLOWED = ["-W", "ignore:read_text is deprecated:DeprecationWarning",
           "-W", "ignore:open_text is deprecated:DeprecationWarning",
           "-W", "ignore:This API is experimental:DeprecationWarning"]


def readme_snippets():
    return dict(SNIPPET.findall((REPO / "README.md").read_text()))


@pytest.fixture(scope="module")
def xnnpack_files(tmp_path_factory):
    """The three files of a calibrated LeNet, and the sample's first test digits."""
    directory = tmp_path_factory.mktemp("int8")
    torch.manual_seed(0)
    model = load_user_model(REPO / "data" / "sample" / "generic" / "mnist_model.py")
    images, labels = torch.load(SAMPLE_CLIENTS[0] / "test_dataset.pth", weights_only=True)
    prepared = quant.prepare_ptq(model, (images[:1],), "xnnpack")
    quant.calibrate(prepared, [(images[:64],)], 1)
    int8 = quant.convert(prepared)
    quant.write_artifacts(int8, (images[:1],), directory, "xnnpack")
    torch.save(images[:16], directory / "images.pt")
    expected = int8(images[:16]).argmax(dim=1)
    return directory, expected


def test_readme_has_a_snippet_per_file():
    assert set(readme_snippets()) == {"pte", "onnx", "pt2"}


@pytest.mark.parametrize("name", ["pte", "onnx", "pt2"])
def test_snippet_runs_without_warnings_and_predicts_like_the_int8_model(xnnpack_files, name):
    directory, expected = xnnpack_files
    program = ("import torch\nimages = torch.load('images.pt')\n" + readme_snippets()[name]
               + "\nprint(','.join(str(int(i)) for i in torch.as_tensor(logits).argmax(dim=1)))\n")
    result = subprocess.run([sys.executable, *DEPRECATIONS_ARE_ERRORS, *ALLOWED, "-c", program],
                            cwd=directory, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    notices = [line for line in result.stderr.lower().splitlines()
               if "deprecat" in line and KNOWN_LIBRARY_NOTICE not in line]
    assert not notices, result.stderr[-3000:]
    predictions = [int(value) for value in result.stdout.strip().splitlines()[-1].split(",")]
    agreement = sum(p == e for p, e in zip(predictions, expected.tolist())) / len(predictions)
    assert len(predictions) == 16 and agreement >= 15 / 16
