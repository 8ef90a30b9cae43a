"""A site's dataset files: a torch.save'd Dataset or a plain (inputs, labels) tuple of tensors.

`load_dataset` reads the file and checks what can be checked without reading samples;
`describe_dataset` reads every label and returns what the federation needs to know.

Before anything is unpickled, the archive's declared sizes are checked (a deflated zip of a
megabyte can declare gigabytes of tensor data); inputs with NaN or infinite values are refused
naming the file, before they could spoil the federation's model.
"""
import importlib
import numbers
import os
import pickle
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.data import Dataset, IterableDataset, Subset, TensorDataset

from inputs.errors import InputError, user_code_exit

# A torch.save archive stores tensors uncompressed: its data is about its file size. One whose
# entries expand to more than this many times the file (and more than the floor) is a
# decompression bomb, as is one that would not fit in this machine's memory.
MAX_EXPANSION = 20
EXPANSION_FLOOR_BYTES = 64 * 2**20


@dataclass(frozen=True)
class DatasetInfo:
    n: int
    input_shape: tuple   # one sample, e.g. (1, 28, 28)
    n_classes: int       # max label + 1
    labels: list         # sorted distinct labels
    # every sample's label, in order (what a stratified validation split needs)
    sample_labels: torch.Tensor = field(default=None, repr=False, compare=False)

    def subset(self, indices):
        """The description of the samples at `indices` (n and distinct labels; the class
        count stays the whole set's: the model's outputs do not change)."""
        labels = self.sample_labels[torch.as_tensor(indices, dtype=torch.long)]
        return replace(self, n=len(indices), labels=torch.unique(labels).tolist(), sample_labels=labels)


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


def physical_memory_bytes():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**40


def check_archive_size(path, key, memory_bytes=None):
    """Refuse a torch.save zip archive whose entries (as its central directory declares them:
    what unpacking allocates) expand far beyond the file or beyond this machine's memory."""
    if not zipfile.is_zipfile(path):
        return  # the legacy format stores tensors raw; torch.load names any other problem
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise InputError(path, f"cannot be read as a torch.save file (corrupt or truncated?): "
                               f"{error}", key=key) from None
    declared = sum(entry.file_size for entry in entries)
    file_size = path.stat().st_size
    memory_bytes = memory_bytes or physical_memory_bytes()
    if declared > memory_bytes:
        raise InputError(path, f"declares {declared} bytes of data, more than this machine's "
                               f"{memory_bytes} bytes of memory", key=key)
    if declared > max(MAX_EXPANSION * file_size, EXPANSION_FLOOR_BYTES):
        raise InputError(path, f"a {file_size} byte file that declares {declared} bytes of data "
                               f"(x{declared // max(file_size, 1)}): a compressed archive or a "
                               f"decompression bomb, not a torch.save file (it stores tensors "
                               f"uncompressed)", key=key)


def _torch_load(path, key):
    check_archive_size(path, key)
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
    except BaseException as error:  # SystemExit, KeyboardInterrupt from the dataset's code
        raise user_code_exit(error, path, "unpickling the dataset", key) from None


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
    check_finite(inputs, path, key)
    return inputs, labels


def check_finite(inputs, path, key, first_sample=0):
    """Refuse inputs with NaN or infinite values, naming the file and the first bad sample."""
    finite = torch.isfinite(inputs)
    if bool(finite.all()):
        return
    bad = ~finite.reshape(len(inputs), -1).all(dim=1)
    n_nan, n_inf = int(torch.isnan(inputs).sum()), int(torch.isinf(inputs).sum())
    first = first_sample + int(bad.nonzero()[0, 0])
    raise InputError(path, f"inputs hold {n_nan} NaN and {n_inf} infinite values, in "
                           f"{int(bad.sum())} sample(s), the first sample {first}; remove or "
                           f"repair them (they would spoil the federation's model)", key=key)


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
    return DatasetInfo(n=n, input_shape=input_shape, n_classes=int(distinct[-1]) + 1, labels=distinct,
                       sample_labels=labels)


def _labels_and_shape(dataset, n, path, key):
    tensors = _tensors_behind(dataset)
    if tensors is not None:
        # Stored tensors: every sample has the same shape; read labels without indexing each sample.
        inputs, labels = tensors
        _check_inputs_dtype(inputs.dtype, path, key)
        check_finite(inputs, path, key)
        return labels, tuple(inputs.shape[1:])
    first_shape, labels = None, []
    for index in range(n):
        sample_input, label = _sample(dataset, index, path, key)
        if first_shape is None:
            first_shape = tuple(sample_input.shape)
        elif tuple(sample_input.shape) != first_shape:
            raise InputError(path, f"sample {index} has shape {list(sample_input.shape)} but sample 0 has "
                                   f"{list(first_shape)}; all inputs need one shape", key=key)
        check_finite(sample_input.unsqueeze(0), path, key, first_sample=index)
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
    except BaseException as error:  # SystemExit, KeyboardInterrupt from the dataset's code
        raise user_code_exit(error, path, f"reading sample {index}", key) from None
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
