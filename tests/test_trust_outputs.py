"""Outputs are written whole or not at all; a full disk says so and names the file.

The full disk is real where this runs as root (a 200 KB tmpfs), and a mocked ENOSPC otherwise.
"""
import errno
import os
import subprocess
import uuid

import numpy as np
import pytest

from outputs import atomic
from outputs.atomic import OutputError, save_with, write_bytes, write_text
from outputs.predictions import write_predictions
from outputs.report import write_report


@pytest.fixture
def full_disk(tmp_path):
    """A directory on a 200 KB tmpfs (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    directory = tmp_path / f"tiny-{uuid.uuid4().hex[:6]}"
    directory.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(directory)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def test_a_file_is_replaced_whole(tmp_path):
    path = tmp_path / "out" / "metrics.json"
    write_text(path, "old")
    write_text(path, "new")
    assert path.read_text() == "new"
    assert os.listdir(path.parent) == ["metrics.json"]  # no temporary file left


def test_a_file_gets_the_modes_a_plain_write_would_give(tmp_path):
    """Not mkstemp's private 0600: the outputs are read by whoever collects them."""
    plain, atomic_file = tmp_path / "plain.txt", tmp_path / "atomic.txt"
    plain.write_text("x")
    write_text(atomic_file, "x")
    assert atomic_file.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_a_writer_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "model_int8.pt"
    write_bytes(path, b"complete")

    def breaks(handle):
        handle.write(b"partial")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError):
        save_with(path, breaks)
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(path) as temporary:
            temporary.write_bytes(b"partial")
            raise RuntimeError("writer failed")
    assert path.read_bytes() == b"complete"
    assert os.listdir(tmp_path) == ["model_int8.pt"]


def test_a_full_disk_names_the_file_and_leaves_nothing(full_disk):
    path = full_disk / "model_int8.pt"
    with pytest.raises(OutputError) as error:
        write_bytes(path, b"\0" * 400_000)
    assert str(error.value) == f"no space left on device writing {path}"
    assert error.value.short == "no space left writing model_int8.pt"
    assert os.listdir(full_disk) == []


def test_a_full_disk_during_torch_save_is_reported_not_left_truncated(full_disk):
    torch = pytest.importorskip("torch")
    path = full_disk / "model_fp32.pt"
    with pytest.raises(OutputError, match="no space left on device writing"):
        atomic.save_torch({"w": torch.zeros(100_000)}, path)
    assert os.listdir(full_disk) == []


def test_report_and_predictions_on_a_full_disk(full_disk):
    labels = np.arange(50_000) % 10
    with pytest.raises(OutputError) as error:
        write_predictions(full_disk, labels, labels, labels)
    assert error.value.short.startswith("no space left writing y_")
    assert not any(name.startswith(".") for name in os.listdir(full_disk))
    for name in os.listdir(full_disk):
        os.unlink(full_disk / name)
    write_text(full_disk / "filler", "x" * 190_000)
    metrics = {"site": {"id": "a" * 16}, "rounds": [], "fp32": {}, "int8": {}, "federation": {}}
    with pytest.raises(OutputError, match="no space left on device writing"):
        write_report(full_disk, metrics, labels[:20], labels[:20], "config")
    left = sorted(os.listdir(full_disk))
    assert not any(name.startswith(".") for name in left), left  # no temporary files
    for name in left:  # whatever exists is whole
        assert name in ("filler", "y_test.csv", "y_pred.csv", "y_pred_fp32.csv") or name.endswith(".png")


def test_a_mocked_enospc_at_fsync(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", no_space)
    with pytest.raises(OutputError) as error:
        write_text(tmp_path / "report.html", "<html>")
    assert error.value.short == "no space left writing report.html"
    assert os.listdir(tmp_path) == []


def test_the_site_reports_a_full_disk_as_its_status(tmp_path, monkeypatch):
    from federation import engine

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", no_space)
    try:
        write_text(tmp_path / "metrics.json", "{}")
    except OutputError as error:
        assert engine.status_message(error) == "no space left writing metrics.json"
