"""quant.timing: latency measurements take turns when FC_LATENCY_LOCK names a shared file."""
import fcntl
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import quant
from quant.errors import QuantizationError
from quant.timing import LATENCY_LOCK_ENV, measurement_slot, median_ms

REPO = Path(__file__).resolve().parent.parent
# Each process waits until every process is ready (imports done), then times a run that
# sleeps, and writes the wall-clock span of its timed calls.
MEASURER = r"""
import json, sys, time
from pathlib import Path
from quant.timing import median_ms
ready_dir, name, n_processes = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
(ready_dir / f"{name}.ready").touch()
while len(list(ready_dir.glob("*.ready"))) < n_processes:
    time.sleep(0.005)
starts, ends = [], []
def run(batch):
    starts.append(time.time())
    time.sleep(0.02)
    ends.append(time.time())
median_ms(run, None, repeats=15, warmup=1)
# The span from the first call's start to the last call's end, both inside the measurement
# (after it returns the lock is free, and the other process may start before this one reads the clock).
(ready_dir / f"{name}.json").write_text(json.dumps([starts[0], ends[-1]]))
"""


def measure_at_once(tmp_path, lock_path, n_processes=2):
    """The (first call, end) wall-clock span of each process's measurement, all started together."""
    env = {key: value for key, value in os.environ.items() if key != LATENCY_LOCK_ENV}
    if lock_path is not None:
        env[LATENCY_LOCK_ENV] = str(lock_path)
    names = [f"p{index}" for index in range(n_processes)]
    processes = [subprocess.Popen([sys.executable, "-c", MEASURER, str(tmp_path), name, str(n_processes)],
                                  cwd=REPO, env=env) for name in names]
    for process in processes:
        assert process.wait(timeout=120) == 0
    return sorted(json.loads((tmp_path / f"{name}.json").read_text()) for name in names)


def overlap(spans):
    (_, first_end), (second_start, _) = spans
    return first_end > second_start


def test_two_processes_measuring_at_once_take_turns_with_the_lock(tmp_path):
    spans = measure_at_once(tmp_path, tmp_path / "latency.lock")
    assert not overlap(spans), spans


def test_without_the_lock_the_same_two_measurements_overlap(tmp_path):
    # The control: the check above would see an overlap if the lock did nothing.
    assert overlap(measure_at_once(tmp_path, None))


def hold_lock(path):
    """Take the lock as another site would (a flock on its own open file)."""
    lock_file = open(path, "a")
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    return lock_file


def finishes_only_after_release(measure, lock_path):
    """Run `measure` while the lock is held elsewhere: it must wait, then finish once released."""
    held = hold_lock(lock_path)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(value=measure()))
    thread.start()
    thread.join(timeout=1.0)
    waited = thread.is_alive()
    held.close()  # releases the flock
    thread.join(timeout=60)
    assert waited, "the measurement did not wait for the lock"
    assert not thread.is_alive()
    return outcome["value"]


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 4)).eval()


def test_latency_ms_waits_for_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv(LATENCY_LOCK_ENV, str(tmp_path / "latency.lock"))
    batch = torch.randn(8, 1, 4, 4)
    latency = finishes_only_after_release(lambda: quant.latency_ms(tiny_model(), batch, repeats=3),
                                          tmp_path / "latency.lock")
    assert latency > 0


def test_measure_artifact_waits_for_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv(LATENCY_LOCK_ENV, str(tmp_path / "latency.lock"))
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(tiny_model()), str(path))
    loader = [(torch.randn(8, 1, 4, 4), torch.zeros(8, dtype=torch.int64))]
    figures = finishes_only_after_release(
        lambda: quant.measure_artifact(path, loader, batch_sizes=(1, 8), repeats=3), tmp_path / "latency.lock")
    assert set(figures["latency_ms"]) == {1, 8} and min(figures["latency_ms"].values()) > 0


def finishes_soon(measure, seconds=10):
    finished = threading.Event()
    threading.Thread(target=lambda: (measure(), finished.set()), daemon=True).start()
    return finished.wait(timeout=seconds)


def test_without_the_variable_nothing_is_locked(tmp_path, monkeypatch):
    monkeypatch.delenv(LATENCY_LOCK_ENV, raising=False)
    held = hold_lock(tmp_path / "latency.lock")  # a lock nobody told the measurement about
    try:
        assert finishes_soon(lambda: median_ms(lambda batch: None, None, repeats=3))
    finally:
        held.close()


def test_the_slot_can_be_entered_again_by_its_holder(tmp_path, monkeypatch):
    # A site holds the slot for its whole measuring phase; latency_ms inside takes it again.
    monkeypatch.setenv(LATENCY_LOCK_ENV, str(tmp_path / "latency.lock"))

    def nested():
        with measurement_slot():
            median_ms(lambda batch: None, None, repeats=2)

    assert finishes_soon(nested), "a nested measurement waited for its own lock"


def test_an_unusable_lock_path_is_named(tmp_path, monkeypatch):
    missing = tmp_path / "no such dir" / "latency.lock"
    monkeypatch.setenv(LATENCY_LOCK_ENV, str(missing))
    with pytest.raises(QuantizationError, match=f"{LATENCY_LOCK_ENV}={missing}"):
        median_ms(lambda batch: None, None)


def test_repeats_below_one_are_refused():
    with pytest.raises(QuantizationError, match="repeats must be at least 1"):
        median_ms(lambda batch: None, None, repeats=0)
