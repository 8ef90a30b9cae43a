"""Seeding and data loaders, so that a run with the same seed repeats itself."""
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) and prefer deterministic kernels.

    `warn_only`: an op without a deterministic kernel (some CUDA ops) warns instead of failing
    the run; on CPU nearly everything is deterministic already, so this costs nothing there.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int | None = None) -> DataLoader:
    """A DataLoader in this process (num_workers=0: the datasets are small and worker processes
    would each need seeding). When shuffling with a seed, the order comes from a generator of
    its own, so it does not depend on how much of the global random stream was used before."""
    generator = torch.Generator().manual_seed(seed) if shuffle and seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0)
