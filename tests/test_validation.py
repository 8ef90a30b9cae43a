"""The validation split (validation_fraction), federation validation figures, and model selection
and early stopping (keep, patience): split, config, coordinator logic, and the kept round's model
restored at every site (in one process, through bench.simulate's production path)."""
import pytest
import torch

from bench.simulate import load_sites, quantize_sites, run_rounds
from federation.checks import SiteMismatchError, check_report
from federation.coordinator import Coordinator
from federation.messages import Codec
from federation.selection import ModelSelection, selection_report
from inputs.config import parse_config
from inputs.errors import InputError
from inputs.validation_split import split_for_validation, stratified_split
from tests.privacy_helpers import make_tiny_federation

BASE = {"model": "m.py", "train_dataset": "a.pth", "test_dataset": "b.pth"}


# ---- the split ------------------------------------------------------------------------------
def labels_of(counts):
    """Labels interleaved: class c appears counts[c] times, spread over the whole set."""
    labels = [label for label, count in enumerate(counts) for _ in range(count)]
    return torch.tensor(labels)[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]


def test_split_is_stratified_disjoint_and_covers_the_train_set():
    labels = labels_of([500, 300, 150, 50])
    train, validation = stratified_split(labels, 0.1, seed=42)
    assert set(train).isdisjoint(validation) and sorted(train + validation) == list(range(len(labels)))
    assert len(validation) == 100
    held_out = torch.bincount(labels[validation], minlength=4).tolist()
    assert held_out == [50, 30, 15, 5]  # each class in proportion


def test_split_rounds_the_total_and_keeps_one_training_example_per_class():
    labels = labels_of([7, 7, 7, 1])  # 22 samples: 2.2 -> 2 for validation
    train, validation = stratified_split(labels, 0.1, seed=0)
    assert len(validation) == 2
    assert torch.unique(labels[train]).tolist() == [0, 1, 2, 3]
    _, half = stratified_split(labels, 0.5, seed=0)
    assert len(half) == 11 and 3 not in labels[half].tolist()  # the lone class-3 sample trains


def test_split_is_seeded():
    labels = labels_of([200, 200, 100])
    first, again, other = (stratified_split(labels, 0.2, seed)[1] for seed in (7, 7, 8))
    assert first == again and first != other


def test_fraction_zero_keeps_everything_for_training():
    labels = labels_of([5, 5])
    assert stratified_split(labels, 0, seed=1) == (list(range(10)), [])


def test_a_train_set_too_small_for_the_fraction_is_refused_naming_config_and_key():
    with pytest.raises(InputError) as error:
        split_for_validation(torch.tensor([0, 1, 2]), 0.1, 0, "site/config.yml")
    assert "config.yml" in str(error.value) and "validation_fraction" in str(error.value)


def test_sites_train_on_the_rest_and_never_validate_on_the_test_set(tmp_path):
    clients, generic = make_tiny_federation(tmp_path, validation_fraction=0.25)
    site = load_sites(clients[:1], generic)[0]  # 96 train samples
    inputs = site.inputs
    assert (inputs.train_info.n, inputs.validation_info.n, inputs.test_info.n) == (72, 24, 48)
    assert len(inputs.train_loader.dataset) == 72 and len(inputs.validation_loader.dataset) == 24
    assert inputs.summary()["n_train"] == 72
    train_inputs, _ = torch.load(clients[0] / "train_dataset.pth", weights_only=True)
    validation_inputs = torch.cat([batch for batch, _ in inputs.validation_loader])
    train_rows = {tuple(row.flatten().tolist()) for row in train_inputs}
    assert all(tuple(row.flatten().tolist()) in train_rows for row in validation_inputs)


# ---- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, text", [
    ("validation_fraction", 1.0, "a number in [0, 1)"),
    ("validation_fraction", -0.1, "a number in [0, 1)"),
    ("validation_fraction", 0.6, "at most 0.5"),
    ("validation_fraction", True, "a number in [0, 1)"),
    ("validation_fraction", ".1", "a number in [0, 1)"),
    ("keep", "worst", "one of best, last"),
    ("patience", -1, "an integer >= 0"),
    ("patience", 2.5, "an integer >= 0"),
])
def test_bad_values_are_refused_naming_config_and_key(key, value, text):
    with pytest.raises(InputError) as error:
        parse_config({**BASE, key: value}, "site/config.yml")
    message = str(error.value)
    assert "config.yml" in message and key in message and text in message, message


@pytest.mark.parametrize("settings, key", [({"keep": "best"}, "keep"), ({"patience": 3}, "patience")])
def test_selection_without_a_validation_split_is_refused(settings, key):
    with pytest.raises(InputError) as error:
        parse_config({**BASE, "validation_fraction": 0, **settings}, "site/config.yml")
    assert error.value.key == key and "validation_fraction" in str(error.value)


def test_defaults_and_fraction_zero_keeps_the_last_round():
    config = parse_config(dict(BASE))
    assert (config.validation_fraction, config.keep, config.patience) == (0.1, "best", 0)
    assert parse_config({**BASE, "validation_fraction": 0}).keep == "last"


# ---- the coordinator's decision -------------------------------------------------------------
def decisions(losses, **settings):
    selection = ModelSelection(**{"max_iter": len(losses), **settings})
    return [selection.observe(round_number, loss) for round_number, loss in enumerate(losses, start=1)]


def test_keep_best_keeps_the_lowest_validation_loss_so_far():
    kept = [d.kept_round for d in decisions([0.9, 0.5, 0.6, 0.4, 0.4, 0.7])]
    assert kept == [1, 2, 2, 4, 4, 4]  # a tie keeps the earlier round


def test_keep_last_keeps_each_latest_round():
    assert [d.kept_round for d in decisions([0.9, 0.5, 0.6], keep="last")] == [1, 2, 3]


def test_patience_stops_after_that_many_rounds_without_improvement():
    run = decisions([0.9, 0.5, 0.6, 0.55, 0.7, 0.3], patience=3)
    assert [d.stop for d in run] == [False, False, False, False, True, False]
    assert [d.stop for d in decisions([0.9, 0.5, 0.6, 0.4, 0.45, 0.41], patience=3)] == [False] * 6
    assert not any(d.stop for d in decisions([0.5, 0.6, 0.7, 0.8]))  # patience 0: never


def test_patience_never_stops_at_the_last_round_and_warm_up_rounds_do_not_count():
    assert not decisions([0.5, 0.6], patience=1)[-1].stop  # max_iter reached anyway
    run = decisions([0.1, 0.9, 0.8, 0.85], first_candidate=2, patience=2)
    assert [d.kept_round for d in run] == [1, 2, 3, 3] and not any(d.stop for d in run)


def test_the_report_says_which_round_and_why():
    last = decisions([0.9, 0.123, 0.6, 0.7], patience=2, max_iter=10)[-1]
    report = selection_report(last, max_iter=10)
    assert report["kept_round"] == 2 and report["stopped_early"] and report["rounds_run"] == 4
    assert report["reason"] == ("best validation loss 0.123 at round 2 of 4; stopped early after round 4: "
                                "no improvement for 2 rounds")
    assert "as keep: last says" in selection_report(decisions([0.9, 0.5], keep="last")[-1], 2)["reason"]
    averaged = selection_report(last, max_iter=10, model_ema=0.5)
    assert averaged["model_ema"] == 0.5 and averaged["reason"].endswith(
        "the written model is the moving average (model_ema 0.5) of the global models of rounds 1 to 2")
    assert report["model_ema"] == 0 and "moving average" not in report["reason"]


def test_decision_reports_are_range_checked():
    good = {"round": 3, "kept_round": 2, "stop": False, "best_validation_loss": 0.2, "keep": "best", "patience": 0}
    check_report("decision", good, "c")
    for bad in ({"stop": 1}, {"kept_round": 0}, {"best_validation_loss": float("nan")}, {"keep": "worst"}):
        with pytest.raises(SiteMismatchError):
            check_report("decision", {**good, **bad}, "c")


class FakeSite:
    def __init__(self, config):
        self.config, self.codec = config, Codec()


def test_federation_validation_figures_are_weighted_by_validation_samples():
    # aggregation as load_site_inputs resolves `auto` for the app's own loop
    coordinator = Coordinator(FakeSite(parse_config({**BASE, "patience": 1, "max_iter": 5,
                                                     "aggregation": "scaffold"})))
    coordinator._update_meta = [{"n_train": 10, "train_loss": 1.0, "train_accuracy": 0.5}]
    tests = [{"n_test": 10, "test_loss": 1.0, "test_accuracy": 0.5, "n_validation": 30,
              "validation_loss": 0.2, "validation_accuracy": 0.9},
             {"n_test": 10, "test_loss": 1.0, "test_accuracy": 0.5, "n_validation": 10,
              "validation_loss": 0.6, "validation_accuracy": 0.5},
             {"n_test": 10, "test_loss": 1.0, "test_accuracy": 0.5, "n_validation": 0,
              "validation_loss": None, "validation_accuracy": None}]
    row = coordinator.record_round(1, [(sender, Codec.encode_report(test)) for sender, test in enumerate(tests)])
    assert row["validation_loss"] == pytest.approx(0.3) and row["validation_accuracy"] == pytest.approx(0.8)
    decision = Codec.decode_report("c", coordinator.decide(), "decision")
    assert decision["kept_round"] == 1 and decision["best_validation_loss"] == pytest.approx(0.3)
    with pytest.raises(SiteMismatchError, match="site 7 sent n_validation 5"):
        coordinator.record_round(2, [(7, Codec.encode_report({**tests[2], "n_validation": 5}))])


# ---- the kept round's model at every site ---------------------------------------------------
@pytest.mark.parametrize("secure", [False, True])
def test_the_kept_rounds_global_model_is_what_every_site_quantizes(tmp_path, secure):
    # A learning rate this high makes round 2 worse than round 1 on the tiny federation.
    clients, generic = make_tiny_federation(tmp_path, learning_rate=0.3, max_iter=6, patience=1,
                                            secure_aggregation=secure)
    sites = load_sites(clients, generic)
    result = run_rounds(sites)
    losses = [row["validation_loss"] for row in result["rounds"]]
    kept = result["selection"]["kept_round"]
    assert len(losses) < 6 and result["selection"]["stopped_early"]
    assert kept < len(losses) and losses[kept - 1] == min(losses)
    quantize_sites(sites)
    for site in sites:  # the written fp32 model is the kept round's: its test figures are that round's
        kept_row = site.rounds[kept - 1]
        assert site.results["fp32"]["accuracy"] == pytest.approx(kept_row["test_accuracy"])
        assert site.results["fp32"]["loss"] == pytest.approx(kept_row["test_loss"], rel=1e-5)
    digests = {artifact["digest"] for site in sites for artifact in site.artifacts}
    assert len(digests) == len(sites[0].artifacts)
