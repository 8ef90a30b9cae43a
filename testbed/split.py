"""python -m testbed.split: turn one dataset into FeatureCloud client dirs.

    python -m testbed.split --out DIR --sites N [--source mnist|cifar10|PATH.pth] [--data-root DIR]
        [--split iid|dirichlet] [--alpha A] [--test-fraction F] [--seed S]
        [--model FILE] [--config-from FILE] [--overwrite] [--centralized]

writes DIR/client_<i>/{train,test}_dataset.pth (plain `(inputs float32, labels int64)` tuples)
and DIR/generic/{config.yml, <model file>}, ready for
`python -m testbed --generic DIR/generic DIR/client_1 ... --out DIR_run`.
With --centralized: the baseline of that N-site federation, one site (client_1) holding the
union of the N sites' train splits, tested on the union of their test splits (the samples
the federation's accuracy is measured on), so the two figures are comparable.

Splits (all driven by one numpy Generator seeded with --seed, so the same arguments give the
same bytes):
- iid: shuffle, then equal chunks (sizes differ by at most one).
- dirichlet: label skew as in the usual FL benchmarks: for each class, site shares are drawn
  from Dir(alpha, ..., alpha) and that class's (shuffled) samples are cut at those shares.
  When a site ends up with fewer than `min_site_samples`, the whole draw is repeated
  (rejection sampling: the skew keeps its Dirichlet law, conditioned on the minimum).
Each site's test split is `round(test_fraction * n)` samples (at least one, leaving at least
one for training), stratified: every class gives its share, rounded by largest remainder.
"""
import argparse
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from data.make_sample import save_deterministic, split_evenly
from inputs.config import APP_KEY, CONFIG_FILE, parse_config, read_app_section
from inputs.errors import InputError
from inputs.datasets import load_dataset

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "results"  # git-ignored: the testbed's default --out is under it
SCHEMES = ("iid", "dirichlet")
TORCHVISION_SOURCES = {"mnist": "MNIST", "cifar10": "CIFAR10"}  # --source -> torchvision class
# The bundled model for each input shape, so that --model is only needed for other data.
BUNDLED_MODELS = {
    (1, 28, 28): REPO_ROOT / "data" / "sample" / "generic" / "mnist_model.py",
    (3, 32, 32): REPO_ROOT / "data" / "models" / "cifar_model.py",
}
TRAIN_FILE = "train_dataset.pth"
TEST_FILE = "test_dataset.pth"
GENERIC_DIR = "generic"
# Enough for a train and a test split and a few batches' worth of statistics.
MIN_SITE_SAMPLES = 10
DIRICHLET_ATTEMPTS = 1000
# The bundled sample's settings (one source: its config.yml); write_client_dirs fills in the file keys.
SAMPLE_CONFIG = REPO_ROOT / "data" / "sample" / "generic" / "config.yml"
DEFAULT_CONFIG = {key: value for key, value in read_app_section(SAMPLE_CONFIG).items()
                  if key not in ("model", "train_dataset", "test_dataset")}
LOAD_BATCH = 1024


# ---------------------------------------------------------------- reading the source

def load_source(source, data_root="data/downloads", download=True):
    """(inputs float32 [N, ...], labels int64 [N]) from "mnist", "cifar10" (torchvision's
    train split, scaled to [0, 1] by ToTensor) or a .pth file the app accepts."""
    if source in TORCHVISION_SOURCES:
        return dataset_to_tensors(_torchvision_train_split(source, data_root, download), source)
    path = Path(source)
    if path.suffix != ".pth":
        raise ValueError(f"--source {source!r}: expected {', '.join(TORCHVISION_SOURCES)} "
                         f"or a .pth dataset file")
    return dataset_to_tensors(load_dataset(path, key="--source"), str(path))


def _torchvision_train_split(source, data_root, download):
    # Imported here: only these two sources need torchvision.
    from torchvision import datasets, transforms
    dataset_class = getattr(datasets, TORCHVISION_SOURCES[source])
    try:
        return dataset_class(root=str(data_root), train=True, download=download,
                             transform=transforms.ToTensor())
    except (RuntimeError, OSError) as error:
        raise ValueError(f"--source {source}: cannot open torchvision's {dataset_class.__name__} "
                         f"under {data_root}: {error}") from None


def dataset_to_tensors(dataset, name):
    """Read every (input, label) sample of a map-style dataset into two stacked tensors."""
    if len(dataset) == 0:
        raise ValueError(f"{name}: the dataset is empty")
    _check_sample(dataset[0], name)
    input_batches, label_batches = [], []
    try:
        for batch_inputs, batch_labels in DataLoader(dataset, batch_size=LOAD_BATCH):
            input_batches.append(batch_inputs)
            label_batches.append(batch_labels)
    except RuntimeError as error:  # default_collate cannot stack samples of different shapes
        raise ValueError(f"{name}: cannot stack the samples (do all inputs have one shape?): "
                         f"{error}") from None
    return _checked_pair(torch.cat(input_batches), torch.cat(label_batches), name)


def _check_sample(sample, name):
    if not isinstance(sample, (tuple, list)) or len(sample) != 2:
        raise ValueError(f"{name}: sample 0 is a {type(sample).__name__}; expected an (input, label) pair")
    if not isinstance(sample[0], torch.Tensor):
        raise ValueError(f"{name}: sample 0's input is a {type(sample[0]).__name__}, not a tensor "
                         f"(a torchvision dataset needs transform=ToTensor())")


def _checked_pair(inputs, labels, name):
    if not inputs.dtype.is_floating_point:
        raise ValueError(f"{name}: inputs are {inputs.dtype}; expected floating-point tensors "
                         f"(e.g. pixels scaled to [0, 1])")
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{name}: labels are {labels.dtype} of shape {list(labels.shape)}; "
                         f"expected one integer class index per sample")
    if labels.min().item() < 0:
        raise ValueError(f"{name}: labels include {labels.min().item()}; class indices start at 0")
    return inputs.to(torch.float32), labels.to(torch.int64)


# ---------------------------------------------------------------- splitting

def split_dataset(inputs, labels, n_sites, scheme="iid", alpha=0.5, test_fraction=0.2, seed=0,
                  min_site_samples=MIN_SITE_SAMPLES):
    """Split one dataset into `n_sites` sites; returns, per site,
    (train_inputs, train_labels, test_inputs, test_labels). Same arguments, same split."""
    labels_np = np.asarray(labels, dtype=np.int64)
    _check_split_arguments(len(labels_np), len(inputs), n_sites, scheme, alpha, test_fraction,
                           min_site_samples)
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        site_rows = _iid_rows(len(labels_np), n_sites, rng)
    else:
        site_rows = _dirichlet_rows(labels_np, n_sites, alpha, min_site_samples, rng)
    splits = []
    for rows in site_rows:
        train_rows, test_rows = _stratified_holdout(rows, labels_np, test_fraction, rng)
        splits.append(_take(inputs, labels, train_rows) + _take(inputs, labels, test_rows))
    return splits


def _check_split_arguments(n_labels, n_inputs, n_sites, scheme, alpha, test_fraction, min_site_samples):
    if n_labels != n_inputs:
        raise ValueError(f"{n_inputs} inputs but {n_labels} labels")
    if scheme not in SCHEMES:
        raise ValueError(f"split scheme {scheme!r}: expected one of {', '.join(SCHEMES)}")
    if n_sites < 1:
        raise ValueError(f"sites: {n_sites}; expected at least 1")
    if scheme == "dirichlet" and not alpha > 0:
        raise ValueError(f"alpha: {alpha}; the Dirichlet concentration must be > 0")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test fraction: {test_fraction}; expected a number between 0 and 1 "
                         f"(every site needs a train and a test split; for one site holding "
                         f"everything, the centralized baseline, use --centralized)")
    if min_site_samples < 2:
        raise ValueError(f"min_site_samples: {min_site_samples}; a site needs at least 2 samples "
                         f"(one to train on, one to test on)")
    if n_labels // n_sites < min_site_samples:
        raise ValueError(f"{n_labels} samples are too few for {n_sites} sites of at least "
                         f"{min_site_samples} samples each")


def _iid_rows(n_samples, n_sites, rng):
    order = rng.permutation(n_samples)
    bounds = np.cumsum([0] + split_evenly(n_samples, n_sites))
    return [order[start:end] for start, end in zip(bounds[:-1], bounds[1:])]


def _dirichlet_rows(labels, n_sites, alpha, min_site_samples, rng):
    class_rows = [rng.permutation(np.flatnonzero(labels == label)) for label in np.unique(labels)]
    for _ in range(DIRICHLET_ATTEMPTS):
        site_parts = [[] for _ in range(n_sites)]
        for rows in class_rows:
            shares = rng.dirichlet(np.full(n_sites, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(np.int64)
            for parts, piece in zip(site_parts, np.split(rows, cuts)):
                parts.append(piece)
        site_rows = [np.concatenate(parts) for parts in site_parts]
        if min(len(rows) for rows in site_rows) >= min_site_samples:
            return site_rows
    raise ValueError(f"dirichlet split: after {DIRICHLET_ATTEMPTS} draws with alpha={alpha}, some of "
                     f"the {n_sites} sites still had fewer than {min_site_samples} samples; "
                     f"use a larger alpha or fewer sites")


def _stratified_holdout(rows, labels, test_fraction, rng):
    """(train rows, test rows) of one site, each shuffled; the test rows take every class's
    share of round(test_fraction * n), allotted by largest remainder."""
    n_test = min(max(int(np.floor(test_fraction * len(rows) + 0.5)), 1), len(rows) - 1)
    site_labels = labels[rows]
    classes, class_counts = np.unique(site_labels, return_counts=True)
    exact = class_counts * n_test / len(rows)
    quotas = np.floor(exact).astype(np.int64)
    largest_remainders = np.argsort(-(exact - quotas), kind="stable")
    quotas[largest_remainders[:n_test - quotas.sum()]] += 1
    train_parts, test_parts = [], []
    for label, quota in zip(classes, quotas):
        members = rng.permutation(rows[site_labels == label])
        test_parts.append(members[:quota])
        train_parts.append(members[quota:])
    return rng.permutation(np.concatenate(train_parts)), rng.permutation(np.concatenate(test_parts))


def centralized(splits):
    """One site holding every site's data: (union of the train splits, union of the test
    splits), so a centralized run is tested on exactly the federation's test samples."""
    return [tuple(torch.cat([split[part] for split in splits]) for part in range(4))]


def _take(inputs, labels, rows):
    index = torch.from_numpy(rows)
    # Indexing with a tensor copies, so each saved file holds only its own samples.
    return torch.as_tensor(inputs)[index], torch.as_tensor(labels)[index]


# ---------------------------------------------------------------- writing

def bundled_model_for(input_shape):
    """The repository's model for inputs of this shape (one sample, e.g. (1, 28, 28))."""
    model = BUNDLED_MODELS.get(tuple(input_shape))
    if model is None:
        shapes = ", ".join(f"{list(shape)} ({path.name})" for shape, path in BUNDLED_MODELS.items())
        raise ValueError(f"no bundled model takes inputs of shape {list(input_shape)} (bundled: "
                         f"{shapes}); pass --model FILE")
    return model


def read_config(path):
    """The app's keys from a config.yml (flat or under `fc_quantization:`), validated."""
    try:
        section = read_app_section(path)
        parse_config({APP_KEY: {**_file_keys("model.py"), **section}}, path)
    except InputError as error:
        raise ValueError(f"--config-from {error}") from None
    return section


def _file_keys(model_name):
    return {"model": model_name, "train_dataset": TRAIN_FILE, "test_dataset": TEST_FILE}


def write_client_dirs(splits, out_dir, model_file, config, extra_files=(), overwrite=False):
    """Write out_dir/client_<i>/{train,test}_dataset.pth and out_dir/generic/ (config.yml, the
    model file and any `extra_files`, e.g. a train_function file). In config.yml, the model
    and dataset keys always name the files written here; the rest comes from `config`."""
    out_dir, model_file = Path(out_dir), Path(model_file)
    for source in (model_file, *map(Path, extra_files)):
        if not source.is_file():
            raise FileNotFoundError(f"{source}: file not found")
    file_keys = _file_keys(model_file.name)
    document = {APP_KEY: {**file_keys, **{k: v for k, v in config.items() if k not in file_keys}}}
    parse_config(document, out_dir / GENERIC_DIR / CONFIG_FILE)
    _prepare_out_dir(out_dir, overwrite)
    for site, (train_inputs, train_labels, test_inputs, test_labels) in enumerate(splits, start=1):
        site_dir = out_dir / f"client_{site}"
        site_dir.mkdir(parents=True)
        save_deterministic((train_inputs, train_labels), site_dir / TRAIN_FILE)
        save_deterministic((test_inputs, test_labels), site_dir / TEST_FILE)
    generic = out_dir / GENERIC_DIR
    generic.mkdir(parents=True)
    for source in (model_file, *map(Path, extra_files)):
        shutil.copyfile(source, generic / source.name)
    header = "# Written by python -m testbed.split; every site gets these keys.\n"
    (generic / CONFIG_FILE).write_text(header + yaml.safe_dump(document, sort_keys=False))


def _prepare_out_dir(out_dir, overwrite):
    """Refuse to mix with earlier output; with `overwrite`, remove only what split writes."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is not a directory")
    ours = [path for path in out_dir.iterdir()
            if path.is_dir() and (path.name == GENERIC_DIR or path.name.startswith("client_"))]
    if ours and not overwrite:
        raise FileExistsError(f"{out_dir}: already holds {', '.join(sorted(p.name for p in ours))}; "
                              f"choose another --out or pass --overwrite")
    for path in ours:
        shutil.rmtree(path)


def site_table(splits):
    """One line per site: n_train, n_test and the site's label histogram (train + test)."""
    all_labels = torch.cat([torch.cat([split[1], split[3]]) for split in splits])
    classes = torch.unique(all_labels).tolist()
    width = max(5, len(str(len(all_labels))))
    header = f"{'site':<9}{'n_train':>8}{'n_test':>8}  labels: " + " ".join(f"{c:>{width}}" for c in classes)
    lines = [header]
    for site, (_, train_labels, _, test_labels) in enumerate(splits, start=1):
        site_labels = torch.cat([train_labels, test_labels])
        counts = " ".join(f"{int((site_labels == c).sum()):>{width}}" for c in classes)
        lines.append(f"{f'client_{site}':<9}{len(train_labels):>8}{len(test_labels):>8}  "
                     f"{'':8}{counts}")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line

def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m testbed.split",
        description="Split one dataset into FeatureCloud client dirs (client_<i>/ with "
                    f"{TRAIN_FILE} and {TEST_FILE}) plus a generic/ dir with config.yml and "
                    "the model file.")
    parser.add_argument("--out", type=Path, required=True, help="where client_<i>/ and generic/ go")
    parser.add_argument("--sites", type=int, required=True, help="number of sites")
    parser.add_argument("--source", default="mnist",
                        help="mnist, cifar10 (torchvision's train split, downloaded into "
                             "--data-root if missing) or a .pth dataset file (default: %(default)s)")
    parser.add_argument("--data-root", type=Path, default=Path("data/downloads"),
                        help="torchvision's download dir (default: %(default)s)")
    parser.add_argument("--split", choices=SCHEMES, default="iid", help="(default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="Dirichlet concentration; smaller = more label skew (default: %(default)s)")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="share of each site held out as its test split (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--model", type=Path,
                        help="the model file (default: the bundled model for the input shape: "
                             "mnist_model.py for 1x28x28, cifar_model.py for 3x32x32)")
    parser.add_argument("--config-from", type=Path,
                        help="take the app's settings from this config.yml (default: the "
                             "sample's settings)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace client_*/ and generic/ left in --out by an earlier run")
    parser.add_argument("--centralized", action="store_true",
                        help="write the centralized baseline of this split instead: one site "
                             "(client_1) holding the union of the --sites sites' train splits, "
                             "tested on the union of their test splits")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        inputs, labels = load_source(args.source, args.data_root)
        splits = split_dataset(inputs, labels, args.sites, args.split, args.alpha,
                               args.test_fraction, args.seed)
        if args.centralized:
            splits = centralized(splits)
        model_file = args.model or bundled_model_for(inputs.shape[1:])
        config, extra_files = _config_and_extra_files(args.config_from, model_file)
        write_client_dirs(splits, args.out, model_file, config, extra_files, args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(site_table(splits))
    if args.centralized:
        print(f"\ncentralized baseline of the {args.sites}-site {args.split} split: client_1 holds "
              f"every site's train split and is tested on the union of their test splits")
    print(f"\nwritten to {args.out}; run it with:\n  {testbed_command(args.out, len(splits))}")
    return 0


def testbed_command(split_out, n_sites):
    """The `python -m testbed` command for the dirs written to `split_out`."""
    client_dirs = [str(split_out / f"client_{site}") for site in range(1, n_sites + 1)]
    return shlex.join(["python", "-m", "testbed", "--generic", str(split_out / GENERIC_DIR),
                       *client_dirs, "--out", str(testbed_out_for(split_out))])


def testbed_out_for(split_out):
    """Where the testbed's results for `split_out` should go: beside it (`<out>_run`), unless
    that is inside the repository but outside its git-ignored results/ dir; then under it."""
    split_out = Path(split_out)
    absolute = split_out.resolve()
    if absolute.is_relative_to(REPO_ROOT) and not absolute.is_relative_to(RESULTS_DIR):
        return Path("results") / f"{split_out.name}_run"
    return split_out.parent / f"{split_out.name}_run"


def _config_and_extra_files(config_from, model_file):
    """The settings for config.yml and the files besides the model that they name."""
    if config_from is None:
        return dict(DEFAULT_CONFIG), []
    config = read_config(config_from)
    if config.get("model", model_file.name) != model_file.name:
        print(f"note: {config_from} names model {config['model']!r}; config.yml will name "
              f"{model_file.name!r}, the model file written", file=sys.stderr)
    train_function = config.get("train_function")
    return config, [] if train_function is None else [config_from.parent / train_function]


if __name__ == "__main__":
    sys.exit(main())
