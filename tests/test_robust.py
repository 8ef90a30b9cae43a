"""What peers claim and how the coordinator combines it: range checks on every report, the
coordinator's `final` checked at participants, strict metrics.json, the outlier check, the
weight cap and the robust combinations (federation/robust.py)."""
import math
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from federation import robust
from federation.checks import SiteMismatchError, UpdateError, check_report
from federation.coordinator import Coordinator
from federation.messages import Codec, ModelMessage
from inputs.config import AppConfig, InputError, parse_config
from outputs.results import metrics_json

UPDATE = {"n_train": 100, "train_loss": 0.5, "train_accuracy": 0.9}
FINAL = {"rounds": [{"round": 1, "train_loss": 0.4, "train_accuracy": 0.9, "test_loss": 0.3, "test_accuracy": 0.92}],
         "figures": {"n_sites": 3, "n_train": 4000, "n_test": 1000, "fp32": {"accuracy": 0.95, "loss": 0.15},
                     "int8": {"accuracy": 0.95, "loss": 0.16},
                     "artifacts": [{"file": "model_int8.pt", "accuracy": 0.95, "size_bytes": 88000,
                                    "sha256": "ab" * 32, "digest": "cd" * 32}]},
         "sites": [{"id": "a1", "n_train": 1333, "weight": 0.3333, "excluded_rounds": []}]}


# ---- range checks ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind, change, text", [
    ("update", {"n_train": 10 ** 400}, "'n_train' is an integer of 401 digits: expected an integer in 1..10**9"),
    ("update", {"n_train": 10 ** 18}, "'n_train' is an integer of 19 digits: expected an integer in 1..10**9"),
    ("update", {"n_train": 2.5}, "'n_train' is 2.5: expected an integer"),
    ("update", {"train_loss": float("nan")}, "'train_loss' is nan: expected a finite number >= 0"),
    ("update", {"train_loss": float("inf")}, "'train_loss' is inf: expected a finite number >= 0"),
    ("update", {"train_loss": -0.1}, "'train_loss' is -0.1: expected a finite number >= 0"),
    ("update", {"train_accuracy": 1e300}, "'train_accuracy' is 1e+300: expected a number in [0, 1]"),
    ("update", {"train_accuracy": float("nan")}, "'train_accuracy' is nan: expected a number in [0, 1]"),
    ("test", {"n_test": 0}, "'n_test' is 0: expected an integer in 1..10**9"),
    ("test", {"n_validation": -1}, "'n_validation' is -1: expected an integer in 0..10**9"),
    ("test", {"validation_loss": float("nan")}, "'validation_loss' is nan: expected a finite number >= 0 or null"),
    ("test", {"validation_accuracy": 1.2}, "'validation_accuracy' is 1.2: expected a number in [0, 1] or null"),
    ("global", {"federation_accuracy": 1.5}, "'federation_accuracy' is 1.5: expected a number in [0, 1] or null"),
    ("summary", {"input_shape": [1, 0, 28]}, "'input_shape' is [1, 0, 28]"),
    ("results", {"int8": {"accuracy": 0.9, "loss": float("nan")}}, "'int8.loss' is nan"),
])
def test_report_fields_are_range_checked_naming_the_site(kind, change, text):
    good = {"update": UPDATE, "global": {"federation_accuracy": None},
            "test": {"n_test": 5, "test_loss": 0.2, "test_accuracy": 0.9, "n_validation": 0,
                     "validation_loss": None, "validation_accuracy": None},
            "summary": {"n_train": 5, "n_test": 5, "input_shape": [1, 28, 28], "n_classes": 10},
            "results": {"n_train": 5, "n_test": 5, "fp32": {"accuracy": 0.9, "loss": 0.1},
                        "int8": {"accuracy": 0.9, "loss": 0.1}, "artifacts": []}}[kind]
    check_report(kind, good, "s2")
    with pytest.raises(SiteMismatchError, match=f"site s2 sent a '{kind}' report") as error:
        check_report(kind, {**good, **change}, "s2")
    assert text in str(error.value)


def test_a_huge_value_is_shown_short():
    with pytest.raises(SiteMismatchError) as error:
        check_report("update", {**UPDATE, "train_loss": "x" * 10_000}, "s2")
    assert len(str(error.value)) < 200 and "'xxxx" in str(error.value)


@pytest.mark.parametrize("change, text", [
    (lambda final: final["figures"]["int8"].update(accuracy=99.9), "'figures.int8.accuracy' is 99.9"),
    (lambda final: final.pop("figures"), "'figures' is None: expected a JSON object"),
    (lambda final: final["rounds"][0].update(test_loss=float("nan")), "'rounds[0].test_loss' is nan"),
    (lambda final: final["sites"][0].update(n_train=10 ** 18), "'sites[0].n_train' is an integer of 19 digits"),
])
def test_the_coordinators_final_message_is_checked_at_participants(change, text):
    import copy
    final = copy.deepcopy(FINAL)
    assert Codec.decode_report("coord", Codec.encode_report(final), "final") == final
    change(final)
    with pytest.raises(SiteMismatchError, match="site coord sent a 'final' report") as error:
        Codec.decode_report("coord", Codec.encode_report(final), "final")
    assert text in str(error.value)


def test_metrics_json_is_strict_and_a_nan_names_its_field():
    assert metrics_json({"fp32": {"loss": 0.5}}) == '{\n  "fp32": {\n    "loss": 0.5\n  }\n}'
    with pytest.raises(ValueError, match=r"metrics.json: 'metrics.rounds\[1\].test_loss' is nan, not a finite number"):
        metrics_json({"rounds": [{"test_loss": 0.1}, {"test_loss": math.nan}]})


@pytest.mark.parametrize("key, value, text", [
    ("robust_aggregation", "krum", "one of none, norm_clip, trimmed_mean, median"),
    ("outlier_factor", 1, "a number > 1"),
    ("max_site_weight", 0, "a number in (0, 1]"),
    ("min_cosine", 1, "a number in (0, 1)"),
    ("min_cosine", -0.1, "a number in (0, 1)"),
    ("min_cosine", "0.1", "a number in (0, 1)"),
])
def test_robustness_settings_are_validated(key, value, text):
    document = {"model": "m.py", "train_dataset": "a.pth", "test_dataset": "b.pth", key: value}
    with pytest.raises(InputError, match=f"key '{key}'") as error:
        parse_config(document)
    assert text in str(error.value)
    assert parse_config({**document, key: None if key != "robust_aggregation" else "median"})


# ---- robust combinations on hand-made updates ---------------------------------------------

PREVIOUS = {"w": torch.zeros(4), "count": torch.tensor(3)}


def states(*values):
    return [{"w": torch.full((4,), float(value)), "count": torch.tensor(index)} for index, value in enumerate(values)]


HONEST = (1.0, 1.1, 0.9, 1.05, 0.95)


@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_median_and_trimmed_mean_resist_one_outlier(method):
    poisoned = states(*HONEST[:4], -1000.0)
    combined = robust.COMBINE[method](PREVIOUS, poisoned, [1] * 5)
    assert 0.9 <= combined["w"][0].item() <= 1.1
    assert combined["count"].item() == 4  # a counter: the largest
    weighted = robust.COMBINE["none"](PREVIOUS, poisoned, [1] * 5)
    assert weighted["w"][0].item() < -190  # what a plain average does


def test_median_and_trimmed_mean_by_hand():
    values = states(1, 5, 2, 4, 100)
    assert robust.median(PREVIOUS, values, None)["w"].tolist() == [4.0] * 4
    assert robust.median(PREVIOUS, values[:4], None)["w"].tolist() == [3.0] * 4  # mean of the middle two
    assert robust.trimmed_mean(PREVIOUS, values, None)["w"].tolist() == [pytest.approx(11 / 3)] * 4


def test_norm_clip_bounds_each_change_by_the_median_norm():
    values = states(1, 1, 1, 1, 30)  # changes of norm 2 and one of norm 60
    combined = robust.norm_clip(PREVIOUS, values, [1] * 5)
    # The outlier's change is scaled down to norm 2 (the median): every entry 1.
    assert combined["w"].tolist() == [pytest.approx(1.0)] * 4
    sign_flipped = states(1, 1, 1, 1, -5)
    assert robust.norm_clip(PREVIOUS, sign_flipped, [1] * 5)["w"][0].item() == pytest.approx(0.6)


def test_outliers_are_measured_against_the_other_sites_median():
    distances = robust.update_distances(PREVIOUS, states(*HONEST, 30))
    assert distances[0] == pytest.approx(2.0)  # sqrt(4 * 1**2)
    assert [(index, round(ratio)) for index, ratio in robust.find_outliers(distances, 4)] == [(5, 30)]
    assert robust.find_outliers(distances, None) == []
    assert robust.find_outliers(robust.update_distances(PREVIOUS, states(1, 30)), 4)[0][0] == 1  # two sites suffice


def test_distances_are_compared_per_square_root_of_the_local_steps():
    # batch 32: 100 samples are 4 steps, 1,600 are 50; the weight cap 0.5 lets a claim count
    # up to the others' total (400 here: 13 steps)
    assert robust.distances_per_step([2.0, 2.0], [100, 1600], 32, None) == [1.0, pytest.approx(2 / 50 ** 0.5)]
    assert robust.credible_sizes([100, 100, 100, 100, 1600], 0.5) == [100, 100, 100, 100, 400]
    assert robust.credible_sizes([100, 100, 100, 100, 1600], None) == [100, 100, 100, 100, 1600]
    assert robust.credible_sizes([100, 300], 0.25) == [100, pytest.approx(100 / 3)]  # a quarter of 133
    assert robust.credible_sizes([7], 0.5) == [7]  # one site: nothing to compare with


def test_a_large_honest_site_is_no_outlier_and_a_large_claim_buys_little_room():
    # 16 times the data, 6 times as far (distance grew about linearly with the steps in
    # bench.federated_quality's 10-site Dirichlet 0.1 runs): per square root of its capped
    # steps it is 6.7 / sqrt(13 / 4) = 3.7 times the others' (6.7: `updates` adds 5 % per site)
    aggregator, start = coordinator()
    aggregator.aggregate(updates(start, (1, 1, 1, 1, 6), n_train=(100, 100, 100, 100, 1600)))
    # the same distance with the others' sizes was a stop before and still is
    aggregator, start = coordinator()
    with pytest.raises(UpdateError, match="site s5 is an outlier: 6.7 times"):
        aggregator.aggregate(updates(start, (1, 1, 1, 1, 6)))
    # a claim of 10**9 samples counts as the others' total: x30 still stops the run
    aggregator, start = coordinator()
    with pytest.raises(UpdateError, match="site s5 is an outlier: 18.5 times"):
        aggregator.aggregate(updates(start, (1, 1, 1, 1, 30), n_train=(100, 100, 100, 100, 10 ** 9)))


def skewed_changes(n_sites, skew, dim=60_000, seed=0):
    """Synthetic honest changes under label skew: a direction the sites share plus one of each
    site's own `skew` times as long (skew 1: each site's own part as large as the shared one;
    60,000 weights, about LeNet's)."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(dim, generator=generator, dtype=torch.float64)
    return [shared + skew * torch.randn(dim, generator=generator, dtype=torch.float64) for _ in range(n_sites)]


def noise_like(change, seed=9):
    noise = torch.randn(change.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return noise * change.norm() / noise.norm()


@pytest.mark.parametrize("n_sites", [3, 5, 8])
def test_random_noise_is_flagged_and_skewed_honest_updates_are_not(n_sites):
    default = AppConfig(model="m.py", train_dataset="a.pth", test_dataset="b.pth").min_cosine
    assert default == 0.02
    honest = skewed_changes(n_sites, skew=2.0)  # pairwise cosines about 0.2, as on Dirichlet(0.5)
    last = skewed_changes(n_sites, skew=2.0, seed=1)  # each site's change of the round before
    pulling_away = [*honest[:-1], -honest[-1]]  # one site pointing against the others' direction
    assert min(robust.median_cosines(pulling_away)) < -0.15  # as strongly skewed honest sites measured
    for changes in (honest, pulling_away):
        assert robust.find_random_updates(changes, last, default) == []
    poisoned = [honest[0], noise_like(honest[1]), *honest[2:]]
    last_noise = [last[0], noise_like(honest[1], seed=8), *last[2:]]  # fresh noise each round
    [(index, largest, bound)] = robust.find_random_updates(poisoned, last_noise, default)
    assert index == 1 and largest < bound == pytest.approx(4 / math.sqrt(60_000))
    assert robust.find_random_updates(poisoned, last_noise, None) == []


def test_a_sites_first_update_is_not_judged():
    # Round 1: nothing of its own to compare with; honest round-1 updates of sites holding one
    # or two classes measured as unrelated to the others as noise (0.010).
    honest = skewed_changes(5, skew=2.0)
    poisoned = [*honest[:4], noise_like(honest[4])]
    assert robust.largest_cosines(poisoned, [None] * 5)[4] < 0.016
    assert robust.find_random_updates(poisoned, [None] * 5, 0.02) == []


def test_with_dp_the_noise_check_is_off_unless_min_cosine_is_set():
    # DP-SGD's noise makes honest updates look random (largest |cosine| 0.006 at epsilon 1).
    base = {"model": "m.py", "train_dataset": "a.pth", "test_dataset": "b.pth"}
    dp = {"dp": {"epsilon": 1.0, "delta": 1e-5, "max_grad_norm": 1.0}}
    assert parse_config(base).min_cosine == 0.02
    assert parse_config({**base, **dp}).min_cosine is None
    assert parse_config({**base, **dp, "min_cosine": 0.01}).min_cosine == 0.01


def test_a_change_unrelated_to_the_others_is_kept_if_it_continues_its_own_last_one():
    # A site whose data share nothing with the others' this round (orthogonal to them all), but
    # that pulls where it pulled the round before, is training, not sending noise.
    others = skewed_changes(4, skew=2.0)
    own = noise_like(others[0], seed=3)
    changes = [*others, own]
    last = [*skewed_changes(4, skew=2.0, seed=1), own + 0.5 * noise_like(own, seed=4)]
    assert robust.find_random_updates(changes, last, 0.02) == []
    fresh_noise = [*last[:4], noise_like(own, seed=5)]  # noise again, other noise
    assert robust.find_random_updates(changes, fresh_noise, 0.02)[0][0] == 4


def test_noisy_honest_changes_are_kept_if_they_follow_the_federations_last_step():
    # Many small-batch Adam steps: each site's change is mostly its own noise, so it is as
    # unrelated to the other sites' changes and to its own last one as noise is (0.009 and
    # 0.014 measured at batch 8, 3 animal sites), but it follows the federation's last step,
    # where the sites' noise has averaged out (0.117 and 0.035 measured).
    last_step = noise_like(torch.ones(60_000, dtype=torch.float64), seed=20)

    def noisy_honest(seed):
        return [0.1 * last_step + noise_like(last_step, seed=seed + site) for site in range(3)]
    changes, last = noisy_honest(30), noisy_honest(40)
    assert max(robust.largest_cosines(changes, last)) < 0.016  # without the last step: all "noise"
    assert len(robust.find_random_updates(changes, last, 0.02)) == 3
    assert robust.find_random_updates(changes, last, 0.02, last_step) == []
    poisoned = [*changes[:2], noise_like(last_step, seed=50)]
    [(index, largest, _)] = robust.find_random_updates(poisoned, last, 0.02, last_step)
    assert index == 2 and largest < 0.016  # noise stays noise against the last step too


def test_the_bound_is_min_cosine_or_a_random_directions_4_sigmas():
    assert robust.random_direction_bound(0.02, 1_000) == 0.02  # small model: noise may pass, honest never fails
    assert robust.random_direction_bound(0.02, 1_000_000) == pytest.approx(0.004)


def test_the_noise_check_needs_three_sites_and_skips_zero_changes():
    changes = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]
    assert robust.find_random_updates(changes, changes, 0.5) == []  # two sites: which one is wrong?
    changes = [torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.zeros(4), torch.tensor([1.0, 0.1, 0.0, 0.0]),
               torch.tensor([0.0, 0.0, 1.0, 0.0])]
    last = [*changes[:3], torch.tensor([0.0, 0.0, 0.0, 1.0])]
    assert robust.largest_cosines(changes, last)[1] is None  # no change: no direction
    assert [index for index, *_ in robust.find_random_updates(changes, last, 0.5)] == [3]


def test_weight_cap():
    assert robust.capped_weights([100, 100, 10 ** 9], 0.5) == [0.25, 0.25, 0.5]
    shares = robust.capped_weights([100, 300, 10 ** 9, 10 ** 9], 0.3)
    assert shares == [pytest.approx(0.1), pytest.approx(0.3), 0.3, 0.3]
    assert robust.capped_weights([1, 1, 10 ** 9], 0.2) == [pytest.approx(1 / 3)] * 3  # below 1/n: equal
    assert robust.capped_weights([1333, 1334], 0.5) == [1333, 1334]  # two sites: no cap
    assert robust.capped_weights([100, 200, 300], 0.5) == [100, 200, 300]  # not binding: untouched
    assert robust.capped_weights([100, 10 ** 9], None) == [100, 10 ** 9]


# ---- the coordinator ----------------------------------------------------------------------

def coordinator(features=4, **settings):
    settings.setdefault("aggregation", "fedavg")  # what `auto` resolves to when loading inputs
    settings.setdefault("logit_adjustment", 0)    # likewise (this site has no inputs to count)
    config = AppConfig(model="m.py", train_dataset="a.pth", test_dataset="b.pth", **settings)
    model = torch.nn.Linear(features, 2)
    codec = Codec()
    own = ModelMessage({name: tensor.detach().clone() for name, tensor in model.state_dict().items()})
    codec.expect(own)
    codec.last_global = own.joined()
    site = SimpleNamespace(config=config, codec=codec, parameter_names=lambda: ["weight", "bias"])
    return Coordinator(site), own.weights


def updates(start, scales, n_train=(100, 100, 100, 100, 100)):
    """One update per site: start + scale * a shared direction (+ a small per-site wiggle)."""
    generator = torch.Generator().manual_seed(0)
    direction = {name: torch.randn(tensor.shape, generator=generator) for name, tensor in start.items()}
    pieces = []
    for index, (scale, size) in enumerate(zip(scales, n_train), start=1):
        weights = {name: start[name] + scale * direction[name] * (1 + 0.05 * index) for name in start}
        meta = {"n_train": size, "train_loss": 0.5, "train_accuracy": 0.8}
        pieces.append((f"s{index}", Codec().encode_model(ModelMessage(weights, meta=meta))))
    return pieces


def test_an_outlier_stops_the_run_naming_the_site():
    aggregator, start = coordinator()
    with pytest.raises(UpdateError, match="update from site s3 is an outlier: 30.0 times as far") as error:
        aggregator.aggregate(updates(start, (1, 1, 30, 1, 1)))
    assert "outlier_factor 4" in str(error.value)
    aggregator, start = coordinator()  # a sign flip: the update x -5 relative to the global
    with pytest.raises(UpdateError, match="update from site s2 is an outlier: 4.7 times"):
        aggregator.aggregate(updates(start, (1, -5, 1, 1, 1)))


def test_with_a_robust_method_an_outlier_is_left_out_and_shown():
    aggregator, start = coordinator(robust_aggregation="median")
    pieces = updates(start, (1, 1, 30, 1, 1))
    global_1 = aggregator.codec.decode_model("me", aggregator.aggregate(pieces))
    rows = {row["id"]: row for row in aggregator.sites.values()}
    assert rows["s3"]["excluded_rounds"] == [1] and rows["s3"]["weight"] == 0.0
    assert rows["s1"]["weight"] == 0.25 and rows["s1"]["n_train"] == 100
    # The median of the four others (direction x 1.05, 1.10, 1.20, 1.25): 1.15 x the direction.
    s1 = aggregator.codec.decode_model("s1", pieces[0][1]).weights
    direction = robust.update_distances(start, [s1])[0] / 1.05
    assert robust.update_distances(start, [global_1.weights])[0] == pytest.approx(1.15 * direction, rel=1e-5)


def noisy_updates(start, hostile_index, n_sites=5, seed=1):
    """Honest updates (a shared direction, each site's own wiggle) and one of random direction
    with the norm of the others' changes."""
    generator = torch.Generator().manual_seed(seed)
    direction = {name: torch.randn(tensor.shape, generator=generator) for name, tensor in start.items()}
    pieces = []
    for index in range(1, n_sites + 1):
        own = {name: torch.randn(tensor.shape, generator=generator) for name, tensor in start.items()}
        if index == hostile_index:
            weights = {name: start[name] + own[name] for name in start}
        else:
            weights = {name: start[name] + direction[name] + 0.3 * own[name] for name in start}
        meta = {"n_train": 100, "train_loss": 0.5, "train_accuracy": 0.8}
        pieces.append((f"s{index}", Codec().encode_model(ModelMessage(weights, meta=meta))))
    return pieces


def noisy_rounds(aggregator, start):
    """Two rounds in which s4 sends fresh random noise (each site's own wiggle new too)."""
    global_1 = aggregator.codec.decode_global("me", aggregator.aggregate(noisy_updates(start, hostile_index=4)))
    aggregator.aggregate(noisy_updates(global_1.weights, hostile_index=4, seed=2))


def test_random_noise_stops_the_run_or_is_left_out():
    aggregator, start = coordinator(features=30_000)  # the defaults; 60,002 weights, about LeNet's
    with pytest.raises(UpdateError, match=r"update from site s4 looks like random noise: .* no cosine similarity "
                                          r"above 0\.016 in absolute value .* \(largest 0\.0\d\d; min_cosine 0\.02\)"):
        noisy_rounds(aggregator, start)  # round 2: its first update (round 1) is not judged
    assert len(aggregator.sites) == 5 and aggregator.sites["s4"]["excluded_rounds"] == []
    aggregator, start = coordinator(features=30_000, robust_aggregation="trimmed_mean")
    noisy_rounds(aggregator, start)
    rows = {row["id"]: row for row in aggregator.sites.values()}
    # left out once (in round 2; without record_round both rounds are numbered 1 here)
    assert len(rows["s4"]["excluded_rounds"]) == 1 and rows["s4"]["weight"] == 0.0
    assert [rows[f"s{index}"]["excluded_rounds"] for index in (1, 2, 3, 5)] == [[]] * 4
    unchecked, start = coordinator(features=30_000, min_cosine=None)
    noisy_rounds(unchecked, start)  # no check: averaged in
    assert list(unchecked.sites.values())[3]["weight"] == 0.2


def random_change(start, seed):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(tensor.shape, generator=generator) for name, tensor in start.items()}


def pieces_from(base, changes):
    meta = {"n_train": 100, "train_loss": 0.5, "train_accuracy": 0.8}
    return [(f"s{index}", Codec().encode_model(ModelMessage({name: base[name] + change[name] for name in base}, meta=meta)))
            for index, change in enumerate(changes, start=1)]


def second_round(s5_change):
    """Round 1: five related changes (a shared direction plus each site's own). Round 2: four
    sites go on along a new shared direction, s5 sends `s5_change`, unrelated to theirs."""
    aggregator, start = coordinator(features=30_000)
    shared, s5_own = random_change(start, 1), random_change(start, 2)
    wiggles = [random_change(start, 10 + index) for index in range(5)]
    round_1 = [{name: shared[name] + 0.3 * wiggle[name] for name in start} for wiggle in wiggles[:4]]
    round_1.append({name: shared[name] + s5_own[name] for name in start})
    global_1 = aggregator.codec.decode_global("me", aggregator.aggregate(pieces_from(start, round_1)))
    shared_2 = random_change(start, 3)
    round_2 = [{name: shared_2[name] + 0.3 * wiggle[name] for name in start} for wiggle in wiggles[:4]]
    aggregator.aggregate(pieces_from(global_1.weights, round_2 + [s5_change(start, s5_own)]))


def test_the_coordinator_compares_each_site_with_its_own_last_change():
    second_round(lambda start, own: own)  # unrelated to the others, but where s5 pulled before: kept
    with pytest.raises(UpdateError, match="update from site s5 looks like random noise"):
        second_round(lambda start, own: random_change(start, 4))


def test_no_site_gets_more_than_max_site_weight():
    aggregator, start = coordinator()
    aggregator.aggregate(updates(start, (1, 1, 1, 1, 1), n_train=(100, 100, 100, 100, 10 ** 9)))
    assert [row["weight"] for row in aggregator.sites.values()] == [0.125, 0.125, 0.125, 0.125, 0.5]
    uncapped, _ = coordinator(max_site_weight=None)
    uncapped.aggregate(updates(start, (1, 1, 1, 1, 1), n_train=(100, 100, 100, 100, 10 ** 9)))
    assert list(uncapped.sites.values())[-1]["weight"] > 0.99999


def test_a_message_delivered_twice_is_refused():
    aggregator, start = coordinator()
    pieces = updates(start, (1, 1, 1))
    with pytest.raises(UpdateError, match="site s2 sent more than one 'update' message"):
        aggregator.aggregate(pieces + [pieces[1]])


def test_robust_methods_need_three_sites():
    aggregator, _ = coordinator(robust_aggregation="trimmed_mean")
    summary = Codec.encode_report({"n_train": 5, "n_test": 5, "input_shape": [4], "n_classes": 2})
    with pytest.raises(SiteMismatchError, match="robust_aggregation: trimmed_mean needs at least 3 sites, "
                                                "this federation has 2"):
        aggregator.check_summaries([("s1", summary), ("s2", summary)])


# ---- an honest federation: the defaults change nothing ------------------------------------

def test_honest_federation_is_unchanged_by_the_defaults():
    from bench.simulate import SAMPLE, load_sites, pooled_sample, run_rounds, sample_config
    from testbed.split import split_dataset, write_client_dirs

    inputs, labels = pooled_sample()
    splits = split_dataset(inputs[:600], labels[:600], 3, seed=0)
    config = {**sample_config(), "max_iter": 2, "epochs": 1}
    with tempfile.TemporaryDirectory() as work:
        write_client_dirs(splits, Path(work), SAMPLE / "generic" / config["model"], config)
        clients = sorted(Path(work).glob("client_*"))
        runs = {}
        for name, overrides in (("defaults", {}), ("off", {"outlier_factor": None, "max_site_weight": None,
                                                            "min_cosine": None})):
            sites = load_sites(clients, Path(work) / "generic", overrides)
            runs[name] = (run_rounds(sites)["rounds"], sites[0].local.model.state_dict())
    assert runs["defaults"][0] == runs["off"][0]
    for name, tensor in runs["defaults"][1].items():
        assert torch.equal(tensor, runs["off"][1][name]), name


def test_report_shows_each_sites_claimed_n_train_and_weight():
    from outputs.report import _sites_section
    metrics = {"config": {"robust_aggregation": "median", "max_site_weight": 0.5, "outlier_factor": 4},
               "federation": {"sites": [{"id": "a1", "n_train": 1333, "weight": 0.25, "excluded_rounds": []},
                                        {"id": "b2", "n_train": 10 ** 9, "weight": 0.0, "excluded_rounds": [1, 2]}]}}
    section = _sites_section(metrics)
    assert "<td class='row-label'>b2</td><td>1000000000</td><td>0.00 %</td><td>1, 2</td>" in section
    assert "<td>25.00 %</td><td>none</td>" in section and "robust_aggregation: median" in section
