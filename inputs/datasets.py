"""A site's dataset files: a torch.save'd Dataset or a plain (inputs, labels) tuple of tensors.

`load_dataset` reads the file and checks what can be checked without reading samples;
`describe_dataset` reads every label and returns what the federation needs to know.
"""
import importlib
import numbers
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, IterableDataset, Subset, TensorDataset

from inputs.errors import InputError


@dataclass(frozen=True)
class DatasetInfo:
    n: int
    input_shape: tuple   # one sample, e.g. (1, 28, 28)
    n_classes: int       # max label + 1
    labels: list         # sorted distinct labels


def load_dataset(path, key) -> Dataset:
    """Read `path` (config key `key`) and return a Dataset; a tuple becomes a TensorDataset."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found", key=key)
    content = _torch_load(path, key)
    if isinstance(content, (tuple, list)):
        inputs, labels = _check_pair(content, path, key)
        return TensorDataset(inputs, labels)
    if isinstance(content, IterableDataset):
        raise InputError(path, "holds an IterableDataset; it needs a length and indexing "
                               "(a map-style Dataset or an (inputs, labels) tuple)", key=key)
    if isinstance(content, Dataset):
        if _length(content, path, key) == 0:
            raise InputError(path, "the dataset is empty", key=key)
        return content
    raise InputError(path, f"holds a {type(content).__name__}; expected a torch Dataset or "
                           f"an (inputs, labels) tuple of tensors", key=key)


def _torch_load(path, key):
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:
        weights_only_error = error
    # weights_only refuses any class it does not know, and a Dataset is such a class. So read
    # which classes the file names, and unpickle fully only if one of them is a Dataset. Full
    # unpickling can run code; that is acceptable here because this is the site's own local
    # file, put in its input dir by the site itself, never data received over the network.
    classes = _classes_named_in(path)
    if not classes:  # unreadable, or refused for a reason other than an unknown class
        reason = f"{type(weights_only_error).__name__}: {_first_line(weights_only_error)}"
        raise InputError(path, f"cannot be read as a torch.save file (corrupt or truncated?): {reason}",
                         key=key) from None
    if not any(_is_dataset_class(name) for name in classes):
        raise InputError(path, f"holds objects of {', '.join(sorted(classes))}, which are neither a "
                               f"torch Dataset nor tensors", key=key) from None
    try:
        return torch.load(path, weights_only=False)
    except Exception as error:
        raise InputError(path, f"cannot load the dataset object: {type(error).__name__}: "
                               f"{_first_line(error)} (its class must be importable here)", key=key) from None


def _classes_named_in(path):
    """The classes/functions a torch.save file refers to beyond plain tensors; None when the
    file is not a readable torch.save zip archive."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError, OSError, pickle.UnpicklingError, EOFError, KeyError):
        return None


def _is_dataset_class(qualified_name):
    """Whether "module.Class" names a Dataset subclass (importing its module, as unpickling would)."""
    # The module part may itself contain dots: try the longest importable prefix first.
    parts = qualified_name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:split]))
        except Exception:
            continue
        try:
            for attribute in parts[split:]:
                value = getattr(value, attribute)
        except AttributeError:
            return False
        return isinstance(value, type) and issubclass(value, Dataset)
    return False


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_pair(content, path, key):
    if len(content) != 2 or not all(isinstance(part, torch.Tensor) for part in content):
        kinds = ", ".join(type(part).__name__ for part in content)
        raise InputError(path, f"holds a {type(content).__name__} of ({kinds}); expected "
                               f"(inputs, labels), two tensors", key=key)
    inputs, labels = content
    if inputs.dim() == 0:
        raise InputError(path, "inputs is a single number; expected [N, ...] samples", key=key)
    _check_inputs_dtype(inputs.dtype, path, key)
    _check_labels(labels, path, key)
    if len(inputs) != len(labels):
        raise InputError(path, f"{len(inputs)} inputs but {len(labels)} labels", key=key)
    if len(inputs) == 0:
        raise InputError(path, "the dataset is empty (0 samples)", key=key)
    return inputs, labels


def _check_inputs_dtype(dtype, path, key):
    if not dtype.is_floating_point:
        raise InputError(path, f"inputs are {dtype}; expected floating-point tensors "
                               f"(e.g. pixels scaled to [0, 1] as float32)", key=key)


def _is_integer(dtype):
    """An integer dtype that can hold class indices (bool is not one)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _check_labels(labels, path, key):
    """Labels must be a 1-D tensor of integer class indices >= 0."""
    if labels.dim() != 1:
        raise InputError(path, f"labels have shape {list(labels.shape)}; expected [N] class indices "
                               f"(not one-hot vectors)", key=key)
    if not _is_integer(labels.dtype):
        raise InputError(path, f"labels are {labels.dtype}; expected integer class indices "
                               f"(int64)", key=key)
    if labels.numel() and labels.min().item() < 0:
        raise InputError(path, f"labels include {labels.min().item()}; class indices start at 0", key=key)


def _length(dataset, path, key):
    try:
        return len(dataset)
    except Exception as error:
        raise InputError(path, f"the dataset has no length: {type(error).__name__}: {error}", key=key) from None


def describe_dataset(dataset, path, key) -> DatasetInfo:
    """Read every label of `dataset` (checking them) and one sample's shape."""
    n = _length(dataset, path, key)
    if n == 0:
        raise InputError(path, "the dataset is empty", key=key)
    labels, input_shape = _labels_and_shape(dataset, n, path, key)
    _check_labels(labels, path, key)
    distinct = torch.unique(labels).tolist()
    return DatasetInfo(n=n, input_shape=input_shape, n_classes=int(distinct[-1]) + 1, labels=distinct)


def _labels_and_shape(dataset, n, path, key):
    tensors = _tensors_behind(dataset)
    if tensors is not None:
        # Stored tensors: every sample has the same shape; read labels without indexing each sample.
        inputs, labels = tensors
        _check_inputs_dtype(inputs.dtype, path, key)
        return labels, tuple(inputs.shape[1:])
    first_shape, labels = None, []
    for index in range(n):
        sample_input, label = _sample(dataset, index, path, key)
        if first_shape is None:
            first_shape = tuple(sample_input.shape)
        elif tuple(sample_input.shape) != first_shape:
            raise InputError(path, f"sample {index} has shape {list(sample_input.shape)} but sample 0 has "
                                   f"{list(first_shape)}; all inputs need one shape", key=key)
        labels.append(label)
    return torch.tensor(labels, dtype=torch.int64), first_shape


def _tensors_behind(dataset):
    """(inputs, labels) of a TensorDataset of two tensors, or of a Subset of one; else None."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors
    if isinstance(dataset, Subset):
        inner = _tensors_behind(dataset.dataset)
        if inner is not None:
            indices = torch.as_tensor(list(dataset.indices), dtype=torch.long)
            return inner[0][indices], inner[1][indices]
    return None


def _sample(dataset, index, path, key):
    """One (input tensor, int label) pair, with errors that say what is wrong with it."""
    try:
        sample = dataset[index]
    except Exception as error:
        raise InputError(path, f"reading sample {index} failed: {type(error).__name__}: {error}", key=key) from None
    if not isinstance(sample, (tuple, list)) or len(sample) != 2:
        raise InputError(path, f"sample {index} is a {type(sample).__name__}; expected an (input, label) "
                               f"pair", key=key)
    sample_input, label = sample
    if not isinstance(sample_input, torch.Tensor):
        raise InputError(path, f"sample {index}'s input is a {type(sample_input).__name__}, not a tensor "
                               f"(a torchvision dataset needs transform=ToTensor())", key=key)
    _check_inputs_dtype(sample_input.dtype, path, key)
    if isinstance(label, torch.Tensor):
        if label.dim() != 0:
            raise InputError(path, f"sample {index}'s label has shape {list(label.shape)}; expected one "
                                   f"integer class index (not a one-hot vector)", key=key)
        if not _is_integer(label.dtype):
            raise InputError(path, f"sample {index}'s label is {label.dtype}; expected an integer "
                                   f"class index", key=key)
        label = label.item()
    # numbers.Integral also admits NumPy integers, which torchvision-style datasets often return
    if isinstance(label, bool) or not isinstance(label, numbers.Integral):
        raise InputError(path, f"sample {index}'s label is {label!r}; expected an integer class index", key=key)
    return sample_input, int(label)
