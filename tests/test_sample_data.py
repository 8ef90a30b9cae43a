"""The committed MNIST sample: regenerated exactly by data/make_sample.py, and well formed."""
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"
SITES = ("client_1", "client_2", "client_3")
SPLITS = ("train_dataset.pth", "test_dataset.pth")


def load_split(site, split):
    return torch.load(SAMPLE / site / split, weights_only=True)


def import_make_sample():
    spec = importlib.util.spec_from_file_location("make_sample", ROOT / "data" / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regeneration_reproduces_the_committed_files_byte_for_byte(tmp_path):
    import_make_sample().make_sample(tmp_path)
    for site in SITES:
        for split in SPLITS:
            regenerated = (tmp_path / site / split).read_bytes()
            assert regenerated == (SAMPLE / site / split).read_bytes(), f"{site}/{split} differs"


def test_sizes_are_4000_train_and_1000_test_over_sites_of_1667_1667_1666():
    train_sizes = [len(load_split(site, "train_dataset.pth")[1]) for site in SITES]
    test_sizes = [len(load_split(site, "test_dataset.pth")[1]) for site in SITES]
    assert sum(train_sizes) == 4000 and sum(test_sizes) == 1000
    assert [a + b for a, b in zip(train_sizes, test_sizes)] == [1667, 1667, 1666]


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("split", SPLITS)
def test_each_split_is_a_plain_tuple_of_scaled_images_and_all_ten_labels(site, split):
    inputs, labels = load_split(site, split)
    assert inputs.dtype == torch.float32 and inputs.shape[1:] == (1, 28, 28)
    assert labels.dtype == torch.int64 and labels.shape == (len(inputs),)
    assert inputs.min() >= 0 and inputs.max() <= 1
    assert inputs.max() == 1  # scaled by 255, not e.g. standardised
    assert sorted(labels.unique().tolist()) == list(range(10))


def test_no_digit_appears_in_two_splits():
    rows = torch.cat([load_split(site, split)[0].flatten(1) for site in SITES for split in SPLITS])
    assert len(torch.unique(rows, dim=0)) == 5000
