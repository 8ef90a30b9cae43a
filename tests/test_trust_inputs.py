"""Hostile or broken inputs at one site: YAML bombs and duplicate keys, values past their
bounds, decompression bombs, NaN/Inf data, and user code that exits. Each is an InputError
naming the file, asserted by its message."""
import io
import sys
import time
import zipfile

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from federation.site import Site
from inputs import datasets
from inputs.config import load_config, parse_config
from inputs.errors import InputError, UserCodeError
from tests.e2e_helpers import SAMPLE_CLIENTS
from tests.test_bad_inputs import saved, set_config, site_dir

BASE = {"model": "mnist_model.py", "train_dataset": "train.pth", "test_dataset": "test.pth"}
TRAIN_X, TRAIN_Y = torch.load(SAMPLE_CLIENTS[0] / "train_dataset.pth", weights_only=True)

ALIAS_BOMB = """fc_quantization:
  model: mnist_model.py
  train_dataset: train_dataset.pth
  test_dataset: test_dataset.pth
a0: &a0 [x, x, x, x, x, x, x, x, x, x]
a1: &a1 [*a0, *a0, *a0, *a0, *a0, *a0, *a0, *a0, *a0, *a0]
a2: &a2 [*a1, *a1, *a1, *a1, *a1, *a1, *a1, *a1, *a1, *a1]
a3: &a3 [*a2, *a2, *a2, *a2, *a2, *a2, *a2, *a2, *a2, *a2]
a4: &a4 [*a3, *a3, *a3, *a3, *a3, *a3, *a3, *a3, *a3, *a3]
a5: &a5 [*a4, *a4, *a4, *a4, *a4, *a4, *a4, *a4, *a4, *a4]
a6: &a6 [*a5, *a5, *a5, *a5, *a5, *a5, *a5, *a5, *a5, *a5]
a7: &a7 [*a6, *a6, *a6, *a6, *a6, *a6, *a6, *a6, *a6, *a6]
"""


def config_error(tmp_path, text):
    (tmp_path / "config.yml").write_text(text)
    with pytest.raises(InputError) as error:
        load_config(tmp_path)
    assert len(error.value.short) <= 40
    return str(error.value)


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    started = time.monotonic()
    message = config_error(tmp_path, ALIAS_BOMB.replace("  model:", "  seed: *a7\n  model:"))
    assert "line 2: YAML anchors and aliases (*a7) are not accepted" in message
    assert time.monotonic() - started < 1


def test_an_alias_alone_is_refused_too():
    text = "fc_quantization: &app\n  model: m.py\nother: *app\n"
    with pytest.raises(Exception):
        parse_config(__import__("yaml").safe_load(text))  # plain YAML would accept it...
    # ...the loader refuses it before any value is used
    import yaml

    from inputs.config import StrictLoader
    with pytest.raises(yaml.YAMLError, match="YAML anchors and aliases"):
        yaml.load(text, Loader=StrictLoader)  # noqa: S506


def test_duplicate_keys_are_an_error(tmp_path):
    message = config_error(tmp_path, "fc_quantization:\n  model: m.py\n  train_dataset: a.pth\n"
                                     "  test_dataset: b.pth\n  epochs: 2\n  epochs: 30\n")
    assert "key 'epochs': duplicate key 'epochs' on lines 5 and 6; each key may appear once" in message


def test_values_in_messages_are_cut_to_80_characters(tmp_path):
    message = config_error(tmp_path, f"model: m.py\ntrain_dataset: a.pth\ntest_dataset: b.pth\n"
                                     f"seed: '{'x' * 100_000}'\n")
    assert "key 'seed': must be an integer in 0..2**32-1, got 'xxxx" in message
    assert message.endswith("...") and len(message) < 250


def test_a_huge_config_is_not_read(tmp_path):
    message = config_error(tmp_path, "# " + "x" * 2**21 + "\n")
    assert "a config.yml of more than 1048576 bytes is not a config" in message


@pytest.mark.parametrize("key, value, text", [
    ("batch_size", 10**6, "must be at most 65536 (a larger batch does not fit in memory"),
    ("epochs", 10**9, "must be at most 1000 (local epochs per round"),
    ("max_iter", 10**7, "must be at most 10000 (rounds; each one exchanges the model"),
    ("calibration_batches", 10**8, "must be at most 10000 (observers settle"),
    ("learning_rate", 1e6, "must be at most 100 (a step this large diverges)"),
    ("watchdog_seconds", 10**9, "must be at most 604800 (a week"),
    ("watchdog_seconds", 0, "must be a number of seconds > 0"),
])
def test_upper_bounds_say_why(key, value, text):
    with pytest.raises(InputError) as error:
        parse_config({**BASE, key: value}, "in/config.yml")
    assert f"key '{key}': {text}" in str(error.value)


def test_watchdog_seconds_defaults_to_an_hour():
    assert parse_config(dict(BASE)).watchdog_seconds == 3600
    assert parse_config({**BASE, "watchdog_seconds": 2.5}).watchdog_seconds == 2.5


# ---------------------------------------------------------------- datasets

def deflated(data):
    """The same zip archive with every entry deflated: what a decompression bomb looks like."""
    source, target = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for entry in source.infolist():
            archive.writestr(entry.filename, source.read(entry.filename))
    return target.getvalue()


def test_a_decompression_bomb_is_refused_before_it_is_unpacked(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "EXPANSION_FLOOR_BYTES", 2**20)  # a small bomb for the test
    path = tmp_path / "train_dataset.pth"
    path.write_bytes(deflated(saved((torch.zeros(2_000_000, 1), torch.zeros(2_000_000, dtype=torch.long)))))
    assert path.stat().st_size < 100_000
    loaded = []
    monkeypatch.setattr(datasets.torch, "load", lambda *a, **k: loaded.append(1))
    with pytest.raises(InputError) as error:
        datasets.load_dataset(path, "train_dataset")
    assert "declares 24000" in str(error.value) and "decompression bomb" in str(error.value)
    assert "key 'train_dataset'" in str(error.value) and not loaded


def test_a_dataset_larger_than_memory_is_refused(tmp_path):
    path = tmp_path / "train_dataset.pth"
    path.write_bytes(saved((TRAIN_X[:100], TRAIN_Y[:100])))
    with pytest.raises(InputError, match="more than this machine's 1000 bytes of memory"):
        datasets.check_archive_size(path, "train_dataset", memory_bytes=1000)
    datasets.check_archive_size(path, "train_dataset")  # the real machine: fine


@pytest.mark.parametrize("value, text", [(float("nan"), "1 NaN and 0 infinite"),
                                         (float("inf"), "0 NaN and 1 infinite")])
def test_nan_or_inf_in_a_dataset_names_the_file(tmp_path, value, text):
    directory = site_dir(tmp_path)
    inputs = TRAIN_X.clone()
    inputs[5, 0, 3, 3] = value
    (directory / "train_dataset.pth").write_bytes(saved((inputs, TRAIN_Y)))
    with pytest.raises(InputError) as error:
        Site.load(directory)
    message = str(error.value)
    assert "train_dataset.pth, key 'train_dataset': inputs hold " + text in message
    assert "in 1 sample(s), the first sample 5" in message


def test_nan_in_a_saved_dataset_object_names_the_file(tmp_path):
    inputs = TRAIN_X[:64].clone()
    inputs[10] = float("nan")
    path = tmp_path / "test_dataset.pth"
    path.write_bytes(saved(TensorDataset(inputs, TRAIN_Y[:64])))
    dataset = datasets.load_dataset(path, "test_dataset")
    with pytest.raises(InputError, match="inputs hold 784 NaN and 0 infinite values, in 1 sample"):
        datasets.describe_dataset(dataset, path, "test_dataset")


class ExitingDataset(Dataset):
    """Unpickling it calls sys.exit(4), as a hostile or broken dataset class might."""

    def __init__(self):
        self.size = 1  # some state, so that unpickling calls __setstate__

    def __len__(self):
        return 1

    def __getitem__(self, index):
        return torch.zeros(1), 0

    def __setstate__(self, state):
        sys.exit(4)


def test_sys_exit_while_unpickling_a_dataset_names_the_file(tmp_path):
    path = tmp_path / "train_dataset.pth"
    path.write_bytes(saved(ExitingDataset()))
    with pytest.raises(UserCodeError) as error:
        datasets.load_dataset(path, "train_dataset")
    assert "key 'train_dataset': unpickling the dataset raised sys.exit(4)" in str(error.value)
    assert error.value.short == "sys.exit(4) in train_dataset.pth"


@pytest.mark.parametrize("code, text, short", [
    ("import sys\nsys.exit(3)\n", "importing it raised sys.exit(3)", "sys.exit(3) in mnist_model.py"),
    ("import torch\nclass Model(torch.nn.Module):\n    def __init__(self):\n"
     "        raise KeyboardInterrupt\n", "Model() raised KeyboardInterrupt",
     "KeyboardInterrupt in mnist_model.py"),
])
def test_a_model_file_that_exits_is_an_error_naming_it(tmp_path, code, text, short):
    directory = site_dir(tmp_path)
    (directory / "mnist_model.py").write_text(code)
    with pytest.raises(UserCodeError) as error:
        Site.load(directory)
    assert "mnist_model.py, key 'model': " + text in str(error.value)
    assert error.value.short == short


def test_config_changes_still_load(tmp_path):
    directory = site_dir(tmp_path)
    set_config(directory, watchdog_seconds=120)
    assert Site.load(directory).config.watchdog_seconds == 120
