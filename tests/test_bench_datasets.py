"""The benchmarks' second real dataset: Animal-Shape silhouettes read from the animal-mnist wheel."""
import gzip
import pickle

import numpy as np
import pytest
import torch

from bench.datasets import DATASETS, pooled_animals, read_ndarray


def test_animals_are_ten_balanced_classes_of_28x28_images_in_unit_range():
    inputs, labels = pooled_animals()
    assert inputs.shape == (10_000, 1, 28, 28) and inputs.dtype == torch.float32
    assert torch.equal(torch.bincount(labels), torch.full((10,), 1000))
    assert 0.0 <= inputs.min() and inputs.max() <= 1.0 and inputs.std() > 0.2  # real pictures, not blanks


def test_every_dataset_fits_the_sample_lenet():
    for name, load in DATASETS.items():
        inputs, labels = load()
        assert inputs.shape[1:] == (1, 28, 28), name
        assert set(labels.unique().tolist()) == set(range(10)), name


class _RunsCode:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_read_ndarray_refuses_pickles_that_are_not_plain_arrays(tmp_path):
    good, bad = tmp_path / "good.gz", tmp_path / "bad.gz"
    with gzip.open(good, "wb") as stream:
        pickle.dump(np.arange(6, dtype=np.uint8).reshape(2, 3), stream)
    with gzip.open(bad, "wb") as stream:
        pickle.dump(_RunsCode(), stream)
    assert read_ndarray(good).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        read_ndarray(bad)
