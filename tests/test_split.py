"""testbed.split: sources (torchvision, .pth), iid/dirichlet splits, written client dirs, the
centralized baseline and the printed testbed command. No download."""
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from hypothesis import example, given, settings, strategies as st
from PIL import Image
from torch.utils.data import Subset, TensorDataset
from torchvision.datasets import VisionDataset

from inputs.config import load_config
from inputs.datasets import load_dataset
from testbed import split
from testbed.split import (bundled_model_for, load_source, main, split_dataset, site_table,
                           write_client_dirs)

N_CLASSES = 10
PER_CLASS = 200


def numbered_dataset(per_class=PER_CLASS):
    """Inputs whose single value is the sample's row number, so every sample can be traced."""
    n = N_CLASSES * per_class
    inputs = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1)
    labels = torch.arange(n, dtype=torch.int64) % N_CLASSES
    return inputs, labels


def rows_of(split_inputs):
    return split_inputs.flatten().to(torch.int64).tolist()


def majority_share(labels):
    return torch.bincount(labels).max().item() / len(labels)


class FakeMNIST(VisionDataset):
    """torchvision's MNIST interface (root, train, download, transform; PIL images, int labels)
    over a few generated digits, so the torchvision code path runs without a download."""
    calls = []

    def __init__(self, root, train=True, transform=None, download=False):
        super().__init__(root, transform=transform)
        FakeMNIST.calls.append({"root": root, "train": train, "download": download})
        generator = np.random.default_rng(7)
        self.images = generator.integers(0, 256, size=(300, 28, 28), dtype=np.uint8)
        self.images[:, 0, 0] = 255  # so the scaled maximum is exactly 1
        self.targets = [index % N_CLASSES for index in range(300)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = Image.fromarray(self.images[index], mode="L")
        return self.transform(image), self.targets[index]


@pytest.fixture
def fake_mnist(monkeypatch):
    FakeMNIST.calls = []
    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    return FakeMNIST


# ---------------------------------------------------------------- sources

def test_torchvision_source_reads_the_train_split_scaled_to_unit_range(fake_mnist, tmp_path):
    inputs, labels = load_source("mnist", tmp_path / "downloads", download=False)
    assert fake_mnist.calls == [{"root": str(tmp_path / "downloads"), "train": True, "download": False}]
    assert inputs.dtype == torch.float32 and inputs.shape == (300, 1, 28, 28)
    assert inputs.min() >= 0 and inputs.max() == 1
    expected_first = torch.from_numpy(FakeMNIST(tmp_path).images[0].astype(np.float32) / 255)
    assert torch.equal(inputs[0, 0], expected_first)
    assert labels.dtype == torch.int64 and labels.tolist() == [i % N_CLASSES for i in range(300)]


def test_pth_source_accepts_a_tuple_and_a_dataset_object(tmp_path):
    inputs, labels = numbered_dataset(per_class=3)
    torch.save((inputs.double(), labels.int()), tmp_path / "pair.pth")
    torch.save(Subset(TensorDataset(inputs, labels), [4, 2, 9]), tmp_path / "subset.pth")

    pair_inputs, pair_labels = load_source(str(tmp_path / "pair.pth"))
    assert pair_inputs.dtype == torch.float32 and pair_labels.dtype == torch.int64
    assert torch.equal(pair_inputs, inputs) and torch.equal(pair_labels, labels)
    subset_inputs, subset_labels = load_source(str(tmp_path / "subset.pth"))
    assert rows_of(subset_inputs) == [4, 2, 9] and subset_labels.tolist() == [4, 2, 9]


def test_bad_sources_are_named_in_the_error(tmp_path):
    with pytest.raises(ValueError, match="'imagenet'.*mnist, cifar10"):
        load_source("imagenet")
    torch.save((torch.zeros(3, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64)), tmp_path / "ints.pth")
    with pytest.raises(ValueError, match="ints.pth.*--source.*floating-point"):
        load_source(str(tmp_path / "ints.pth"))


# ---------------------------------------------------------------- splits

@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_every_sample_lands_in_exactly_one_split(scheme):
    inputs, labels = numbered_dataset()
    splits = split_dataset(inputs, labels, 5, scheme, alpha=0.3, test_fraction=0.2, seed=1)
    assert len(splits) == 5
    rows = [row for train_x, _, test_x, _ in splits for row in rows_of(train_x) + rows_of(test_x)]
    assert sorted(rows) == list(range(len(labels)))
    for train_x, train_y, test_x, test_y in splits:  # labels travel with their inputs
        assert torch.equal(train_y, labels[rows_of(train_x)]) and torch.equal(test_y, labels[rows_of(test_x)])


def test_iid_sites_are_equal_sized_and_near_uniform():
    inputs, labels = numbered_dataset()
    splits = split_dataset(inputs, labels, 3, "iid", test_fraction=0.25, seed=3)
    site_sizes = [len(train_y) + len(test_y) for _, train_y, _, test_y in splits]
    assert site_sizes == [667, 667, 666]
    for _, train_y, _, test_y in splits:
        assert majority_share(torch.cat([train_y, test_y])) < 0.16  # uniform would be 0.10


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_each_site_holds_out_its_test_fraction_stratified_by_class(scheme):
    inputs, labels = numbered_dataset()
    test_fraction = 0.3
    splits = split_dataset(inputs, labels, 4, scheme, alpha=0.5, test_fraction=test_fraction, seed=5)
    for _, train_y, _, test_y in splits:
        site_labels = torch.cat([train_y, test_y])
        assert len(test_y) == round(test_fraction * len(site_labels))
        expected = torch.bincount(site_labels, minlength=N_CLASSES) * len(test_y) / len(site_labels)
        assert (torch.bincount(test_y, minlength=N_CLASSES) - expected).abs().max() < 1


def test_small_alpha_skews_labels_far_beyond_iid():
    inputs, labels = numbered_dataset()
    iid = split_dataset(inputs, labels, 5, "iid", seed=0)
    skewed = split_dataset(inputs, labels, 5, "dirichlet", alpha=0.1, seed=0)

    def mean_majority(splits):
        return np.mean([majority_share(torch.cat([s[1], s[3]])) for s in splits])
    assert mean_majority(iid) < 0.15
    assert mean_majority(skewed) > 0.4
    sizes = [len(s[1]) + len(s[3]) for s in skewed]
    assert max(sizes) > 1.5 * min(sizes)  # label skew brings quantity skew with it


def test_dirichlet_gives_every_site_the_minimum_by_redrawing():
    inputs, labels = numbered_dataset(per_class=20)
    splits = split_dataset(inputs, labels, 8, "dirichlet", alpha=0.05, seed=2, min_site_samples=15)
    assert min(len(s[1]) + len(s[3]) for s in splits) >= 15
    assert sum(len(s[1]) + len(s[3]) for s in splits) == len(labels)


def test_impossible_minimum_and_bad_arguments_fail_clearly():
    inputs, labels = numbered_dataset(per_class=2)
    with pytest.raises(ValueError, match="20 samples are too few for 3 sites of at least 10"):
        split_dataset(inputs, labels, 3)
    inputs, labels = numbered_dataset()
    with pytest.raises(ValueError, match="after 1000 draws.*larger alpha"):
        split_dataset(inputs, labels, 20, "dirichlet", alpha=0.001, min_site_samples=90)
    with pytest.raises(ValueError, match="test fraction"):
        split_dataset(inputs, labels, 2, test_fraction=0)
    with pytest.raises(ValueError, match="'shards'"):
        split_dataset(inputs, labels, 2, "shards")
    with pytest.raises(ValueError, match="alpha"):
        split_dataset(inputs, labels, 2, "dirichlet", alpha=0)


@settings(max_examples=25, deadline=None)
@example(n=50, n_sites=5, n_classes=1, test_fraction=0.5, seed=0, scheme="dirichlet")  # once failed
@given(n=st.integers(20, 300), n_sites=st.integers(1, 6), n_classes=st.integers(1, 7),
       test_fraction=st.floats(0.05, 0.95), seed=st.integers(0, 2**32 - 1),
       scheme=st.sampled_from(["iid", "dirichlet"]))
def test_any_feasible_split_partitions_the_data_into_non_empty_train_and_test(
        n, n_sites, n_classes, test_fraction, seed, scheme):
    # feasible: 10 samples per site (MIN_SITE_SAMPLES); a Dirichlet draw needs room above that,
    # since with exactly 10 per site almost no draw of the shares gives every site 10
    n_sites = min(n_sites, n // (10 if scheme == "iid" else 20))
    inputs = torch.arange(n, dtype=torch.float32).reshape(n, 1)
    labels = torch.arange(n) % n_classes
    splits = split_dataset(inputs, labels, n_sites, scheme, alpha=1.0, test_fraction=test_fraction, seed=seed)
    rows = sorted(row for s in splits for row in rows_of(s[0]) + rows_of(s[2]))
    assert rows == list(range(n))
    assert all(len(s[1]) >= 1 and len(s[3]) >= 1 for s in splits)


# ---------------------------------------------------------------- written dirs

def cli(tmp_path, out, *extra):
    return main(["--out", str(out), "--sites", "3", "--data-root", str(tmp_path / "downloads"), *extra])


def test_cli_writes_dirs_the_app_can_read(fake_mnist, tmp_path, capsys):
    out = tmp_path / "fed"
    assert cli(tmp_path, out, "--source", "mnist", "--split", "dirichlet", "--alpha", "0.5") == 0
    assert fake_mnist.calls[0]["download"] is True  # fetching is the CLI's job on the user's machine
    total = 0
    for site in (1, 2, 3):
        for name in ("train_dataset.pth", "test_dataset.pth"):
            dataset = load_dataset(out / f"client_{site}" / name, key=name)
            total += len(dataset)
            inputs, labels = torch.load(out / f"client_{site}" / name, weights_only=True)
            assert inputs.dtype == torch.float32 and inputs.shape[1:] == (1, 28, 28)
            assert labels.dtype == torch.int64
    assert total == 300
    config = load_config(out / "generic")
    assert (config.model, config.train_dataset, config.test_dataset) == (
        "mnist_model.py", "train_dataset.pth", "test_dataset.pth")
    assert config.epochs == split.DEFAULT_CONFIG["epochs"]
    assert (out / "generic" / "mnist_model.py").read_bytes() == bundled_model_for((1, 28, 28)).read_bytes()
    printed = capsys.readouterr().out
    assert "client_3" in printed and "n_train" in printed
    assert f"python -m testbed --generic {out / 'generic'} {out / 'client_1'}" in printed


def test_same_seed_gives_identical_bytes_and_another_seed_another_split(fake_mnist, tmp_path):
    def written(out, seed):
        assert cli(tmp_path, out, "--seed", str(seed)) == 0
        return {str(path.relative_to(out)): path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}
    first, again, other = written(tmp_path / "a", 4), written(tmp_path / "b", 4), written(tmp_path / "c", 5)
    assert first == again
    assert first.keys() == other.keys()
    assert first["client_1/train_dataset.pth"] != other["client_1/train_dataset.pth"]


def test_config_from_keeps_its_settings_but_names_the_written_files(fake_mnist, tmp_path, capsys):
    source_dir = tmp_path / "mine"
    source_dir.mkdir()
    (source_dir / "train.py").write_text("def train(model, loader, config):\n    pass\n")
    (source_dir / "config.yml").write_text(yaml.safe_dump({"fc_quantization": {
        "model": "other_model.py", "train_dataset": "x.pth", "test_dataset": "y.pth",
        "epochs": 7, "quant_type": "qat", "train_function": "train.py"}}))
    model = tmp_path / "my_model.py"
    model.write_text("# my model\n")
    out = tmp_path / "fed"
    assert cli(tmp_path, out, "--config-from", str(source_dir / "config.yml"), "--model", str(model)) == 0
    config = load_config(out / "generic")
    assert (config.model, config.train_dataset, config.test_dataset) == (
        "my_model.py", "train_dataset.pth", "test_dataset.pth")
    assert (config.epochs, config.quant_type, config.train_function) == (7, "qat", "train.py")
    assert config.batch_size == 32  # not in the file: the app's default, not ours added
    assert (out / "generic" / "train.py").is_file() and (out / "generic" / "my_model.py").is_file()
    assert "other_model.py" in capsys.readouterr().err


def test_invalid_config_from_is_named(fake_mnist, tmp_path, capsys):
    bad = tmp_path / "bad.yml"
    bad.write_text("fc_quantization:\n  epochs: 0\n")
    assert cli(tmp_path, tmp_path / "fed", "--config-from", str(bad)) == 2
    assert f"{bad}, key 'epochs'" in capsys.readouterr().err
    assert not (tmp_path / "fed").exists()


def test_earlier_output_is_kept_unless_overwrite_which_removes_stale_sites(tmp_path):
    inputs, labels = numbered_dataset()
    model = bundled_model_for((1, 28, 28))
    out = tmp_path / "fed"
    write_client_dirs(split_dataset(inputs, labels, 4), out, model, split.DEFAULT_CONFIG)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="client_1.*--overwrite"):
        write_client_dirs(split_dataset(inputs, labels, 2), out, model, split.DEFAULT_CONFIG)
    write_client_dirs(split_dataset(inputs, labels, 2), out, model, split.DEFAULT_CONFIG, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["client_1", "client_2", "generic", "notes.txt"]


def test_unknown_input_shape_asks_for_a_model_file():
    with pytest.raises(ValueError, match=r"\[3, 64, 64\].*--model"):
        bundled_model_for((3, 64, 64))
    assert bundled_model_for((3, 32, 32)).name == "cifar_model.py"


def test_site_table_lists_counts_and_histogram():
    inputs, labels = numbered_dataset(per_class=10)
    table = site_table(split_dataset(inputs, labels, 2, test_fraction=0.2, seed=0)).splitlines()
    assert len(table) == 3 and table[0].split()[:3] == ["site", "n_train", "n_test"]
    columns = [line.split() for line in table[1:]]
    assert [(int(c[1]), int(c[2])) for c in columns] == [(40, 10), (40, 10)]
    assert [sum(int(v) for v in c[3:]) for c in columns] == [50, 50]


# ---------------------------------------------------------------- the centralized baseline, the next command

def write_numbered_source(tmp_path):
    inputs, labels = numbered_dataset(per_class=20)
    source = tmp_path / "numbered.pth"
    torch.save((inputs, labels), source)
    model = tmp_path / "tiny_model.py"
    model.write_text("# a model for 1x1x1 inputs\n")
    return source, model


def split_cli(tmp_path, out, *extra):
    source, model = write_numbered_source(tmp_path)
    return main(["--out", str(out), "--sites", "3", "--source", str(source), "--model", str(model),
                 "--split", "dirichlet", "--seed", "3", *extra])


def saved_rows(site_dir, name):
    inputs, labels = torch.load(site_dir / name, weights_only=True)
    return rows_of(inputs), labels.tolist()


def test_centralized_writes_one_site_with_the_union_of_the_federations_splits(tmp_path, capsys):
    assert split_cli(tmp_path, tmp_path / "fed") == 0
    assert split_cli(tmp_path, tmp_path / "central", "--centralized") == 0
    central = tmp_path / "central"
    assert sorted(path.name for path in central.iterdir()) == ["client_1", "generic"]
    for name in (split.TRAIN_FILE, split.TEST_FILE):
        federated = [saved_rows(tmp_path / "fed" / f"client_{site}", name) for site in (1, 2, 3)]
        assert saved_rows(central / "client_1", name) == (
            sum((rows for rows, _ in federated), []), sum((labels for _, labels in federated), []))
    assert load_config(central / "generic").model == "tiny_model.py"
    printed = capsys.readouterr().out
    assert "centralized baseline of the 3-site dirichlet split" in printed
    assert f"--generic {central / 'generic'} {central / 'client_1'} --out" in printed
    assert "client_2" not in printed.split("centralized baseline")[1]


def test_zero_test_fraction_points_to_centralized(tmp_path, capsys):
    assert split_cli(tmp_path, tmp_path / "fed", "--test-fraction", "0") == 2
    assert "--centralized" in capsys.readouterr().err


def test_printed_command_sends_results_beside_the_split_outside_the_repo(tmp_path, capsys):
    out = tmp_path / "fed"
    assert split_cli(tmp_path, out) == 0
    command = capsys.readouterr().out.splitlines()[-1].split()
    assert command[command.index("--out") + 1] == str(tmp_path / "fed_run")
    assert command[:5] == ["python", "-m", "testbed", "--generic", str(out / "generic")]


def git_ignores(path):
    return subprocess.run(["git", "check-ignore", "--no-index", "-q", str(path)],
                          cwd=split.REPO_ROOT).returncode == 0


def test_suggested_results_dirs_are_outside_the_repo_or_git_ignored(tmp_path):
    assert split.testbed_out_for(tmp_path / "fed") == tmp_path / "fed_run"
    assert split.testbed_out_for(Path("results/mnist5")) == Path("results/mnist5_run")
    inside = split.REPO_ROOT / "data" / "mnist5"
    assert split.testbed_out_for(inside) == Path("results/mnist5_run")
    for suggested in (Path("results/mnist5_run"), split.REPO_ROOT / "results" / "mnist5_run"):
        assert git_ignores(suggested)
    assert not git_ignores(inside)  # so the check above can fail


def test_the_testbeds_default_output_dir_is_git_ignored():
    from testbed.__main__ import parse_args
    assert git_ignores(split.REPO_ROOT / parse_args([]).out / "client_1" / "metrics.json")
