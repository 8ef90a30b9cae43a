"""The benchmarks' second real dataset (Animal-Shape silhouettes read from the animal-mnist wheel)
and bench.federated_quality's bookkeeping: max_drop, runs that stop."""
import gzip
import pickle

import numpy as np
import pytest
import torch

from bench.datasets import DATASETS, pooled_animals, read_ndarray
from bench.federated_quality import late_site_drop, max_site_drop


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


def test_max_drop_counts_only_the_converging_part_of_a_run():
    early_swing = [0.5, 0.2, 0.6, 0.7, 0.72]     # round 1 -> 2 falls 30 points: before round 3
    small_site = [0.5, 0.6, 0.7, 0.4, 0.8]       # falls 30 points, but only 50 test samples
    collapse = [0.5, 0.6, 0.84, 0.86, 0.70]      # round 4 -> 5 falls 16 points
    assert max_site_drop([early_swing, small_site], [300, 50]) == 0.0
    assert abs(max_site_drop([early_swing, small_site, collapse], [300, 50, 300]) - 0.16) < 1e-9
    assert abs(max_site_drop([[0.5, 0.6, 0.9, 0.8]], [100]) - 0.1) < 1e-9  # 100 test samples count


def test_late_drop_counts_the_second_half_of_the_rounds_whatever_their_number():
    early = [0.2, 0.3, 0.6, 0.4] + [0.7] * 36                  # 40 rounds: round 3 -> 4 falls 20 points
    late = [0.2, 0.3, 0.6, 0.7] + [0.8] * 16 + [0.9, 0.8] + [0.85] * 18   # round 21 -> 22 falls 10
    assert abs(max_site_drop([early], [300]) - 0.2) < 1e-9
    assert late_site_drop([early], [300]) == 0.0
    assert abs(late_site_drop([early, late], [300, 300]) - 0.1) < 1e-9
    assert late_site_drop([late], [50]) == 0.0                  # too few test samples, as max_drop
    collapse = [0.5, 0.6, 0.84, 0.86, 0.70]                     # 5 rounds: the half is round 3, as max_drop
    assert abs(late_site_drop([collapse], [300]) - 0.16) < 1e-9
    ten_rounds = [0.5, 0.6, 0.7, 0.5] + [0.8] * 6               # round 3 -> 4 of 10: before the half (5)
    assert late_site_drop([ten_rounds], [300]) == 0.0 and max_site_drop([ten_rounds], [300]) > 0.19


def _figures(accuracy):
    return {"accuracy": accuracy, "max_drop": 0.0, "late_drop": 0.0, "train_loss": 0.5, "bytes_per_round": 1000}


def test_a_run_that_stops_is_a_row_of_its_own_and_the_grid_goes_on(monkeypatch, tmp_path):
    from bench import federated_quality
    from federation.checks import UpdateError

    def stops(sites):
        raise UpdateError("update from site 3 looks like random noise", "3", "update looks like noise")
    monkeypatch.setattr(federated_quality, "run_rounds", stops)
    monkeypatch.setattr(federated_quality, "load_sites", lambda *args: [])
    assert federated_quality.run_federation(tmp_path, {}) == {
        "stopped": "UpdateError: update from site 3 looks like random noise"}
    baselines = {"central": _figures(0.95), "central-steps": _figures(0.90)}
    per_seed = [{**baselines, "scaffold": _figures(0.93)}, {**baselines, "scaffold": {"stopped": "UpdateError: x"}}]
    figures = federated_quality.run_figures(per_seed, "scaffold")
    assert figures["accuracy"]["runs"] == [0.93] and figures["stopped"] == ["UpdateError: x"]
    assert figures["gap_central"]["mean"] == pytest.approx(-0.02)
    all_stopped = federated_quality.run_figures([per_seed[1]], "scaffold")
    text = federated_quality.table({"datasets": {"mnist": {"iid-5": {"scaffold": figures, "fedavg": all_stopped}}}})
    assert "1 seed(s) stopped: UpdateError: x" in text and "stopped in every seed: UpdateError: x" in text


def test_rounds_epochs_batch_size_logit_adjustment_and_schedule_flags_set_every_run_of_the_grid():
    from argparse import Namespace

    from bench import federated_quality

    sample = federated_quality.sample_config()
    config = federated_quality.run_config(Namespace(rounds=None, epochs=3, batch_size=16, logit_adjustment=0.0,
                                                    learning_rate_schedule="cosine", model=None))
    assert config["batch_size"] == 16 and config["epochs"] == 3 and config["learning_rate_schedule"] == "cosine"
    assert config["logit_adjustment"] == 0  # 0 is a value (off), not "not given"
    assert config["max_iter"] == sample["max_iter"] and config["model"] == sample["model"]
    unset = Namespace(rounds=None, epochs=None, batch_size=None, logit_adjustment=None, learning_rate_schedule=None,
                      model=None)
    # The grid runs without the moving average unless a variant names one (the app's auto would
    # otherwise follow --epochs and change every baseline measured before it existed).
    assert federated_quality.run_config(unset) == {**sample, "model_ema": 0}


def test_variants_none_runs_the_baselines_alone():
    import argparse

    from bench import federated_quality

    parser = argparse.ArgumentParser()
    args = argparse.Namespace(datasets="mnist", splits="iid", sites="3", variants="none", communications="float32")
    grid, variants, _ = federated_quality.parse_grid(parser, args)
    assert grid == [("mnist", "iid", 3)] and variants == {}
    with pytest.raises(SystemExit):
        federated_quality.parse_grid(parser, argparse.Namespace(**{**vars(args), "variants": "nonsense"}))


def test_model_flag_trains_every_run_of_the_grid_with_that_model_file(tmp_path):
    from argparse import Namespace

    import yaml

    from bench import federated_quality
    from inputs.config import APP_KEY

    model_file = federated_quality.SAMPLE.parent / "models" / "mnist_bn_model.py"
    config = federated_quality.run_config(Namespace(rounds=1, epochs=1, batch_size=32, logit_adjustment=None,
                                                    learning_rate_schedule=None, model=model_file))
    inputs, labels = DATASETS["mnist"]()
    federated_quality.write_setting(inputs[:1000], labels[:1000], "iid", 3, 0, config, tmp_path)
    for run in ("federated", "central", "central-steps"):
        generic = tmp_path / run / "generic"
        assert (generic / model_file.name).read_bytes() == model_file.read_bytes()
        assert yaml.safe_load((generic / "config.yml").read_text())[APP_KEY]["model"] == model_file.name
    sites = federated_quality.load_sites(sorted((tmp_path / "federated").glob("client_*")), tmp_path / "federated" / "generic")
    assert any(isinstance(module, torch.nn.BatchNorm2d) for module in sites[0].local.model.modules())
    central = federated_quality.run_federation(tmp_path / "central", {})
    assert central["accuracy"] > 0.5 and 0 < central["train_loss"] < 1.5  # it trains, and says how far
