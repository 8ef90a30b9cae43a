"""Seeding and data loaders, so that a run with the same seed repeats itself."""
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA); pick deterministic cuDNN kernels.

    On the CPU, torch's kernels are deterministic already. The global switch
    `torch.use_deterministic_algorithms` is left alone: it adds nothing on the CPU and makes
    torch print a warning for every quantized op (e.g. quantized_resize_cpu_) of an int8 model.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int | None = None) -> DataLoader:
    """A DataLoader in this process (num_workers=0: the datasets are small and worker processes
    would each need seeding). When shuffling with a seed, the order comes from a generator of
    its own, so it does not depend on how much of the global random stream was used before."""
    generator = torch.Generator().manual_seed(seed) if shuffle and seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0)
