"""logit_adjustment: every site trains on logits + strength * (log p_site - log p_federation),
from its own label counts and the federation's sum (training/label_shift.py, federation/site.py)."""
import pytest
import torch
from torch import nn

from bench.simulate import load_sites, run_rounds
from federation.checks import PeerMessageError, SiteMismatchError
from federation import robust
from federation.coordinator import Coordinator
from federation.summary import federation_label_counts
from inputs.config import AUTO_LOGIT_ADJUSTMENT, parse_config, resolve_logit_adjustment
from inputs.errors import InputError
from testbed.split import write_client_dirs
from tests.privacy_helpers import TINY_MODEL
from tests.test_fedprox import sites_with_train_file
from training import train
from training.label_shift import adjusted_logits, label_counts, log_prior, logit_offset

BASE = {"model": "m.py", "train_dataset": "a.pth", "test_dataset": "b.pth"}
SITE_CLASSES = ((0, 1), (2, 3), (0, 1, 2, 3))  # strong label skew: two sites see two classes each


def quadrant_data(labels, generator):
    """8x8 images whose class is a bright quadrant (learnable in a few steps)."""
    inputs = torch.rand(len(labels), 1, 8, 8, generator=generator) * 0.5
    for label in range(4):
        rows, cols = divmod(label, 2)
        inputs[labels == label, :, rows * 4:rows * 4 + 4, cols * 4:cols * 4 + 4] += 0.5
    return inputs


def skewed_sites(tmp_path, **config):
    generator = torch.Generator().manual_seed(0)
    splits = []
    for index, classes in enumerate(SITE_CLASSES):
        train_labels = torch.tensor(classes * (60 // len(classes) + index))
        test_labels = torch.tensor(classes * (20 // len(classes)))
        splits.append((quadrant_data(train_labels, generator), train_labels,
                       quadrant_data(test_labels, generator), test_labels))
    model_file = tmp_path / "model.py"
    model_file.write_text(TINY_MODEL)
    section = {"model": "model.py", "train_dataset": "train_dataset.pth", "test_dataset": "test_dataset.pth",
               "batch_size": 16, "learning_rate": 0.03, "epochs": 1, "max_iter": 1, "seed": 3,
               "device": "cpu", "calibration_batches": 2, **config}
    write_client_dirs(splits, tmp_path / "federation", model_file, section)
    clients = sorted((tmp_path / "federation").glob("client_*"))
    return load_sites(clients, tmp_path / "federation" / "generic")


# ---- the offset --------------------------------------------------------------------------

def test_the_offset_is_zero_where_the_site_looks_like_the_federation():
    assert torch.equal(logit_offset([10, 20, 30], [10, 20, 30], 0.5), torch.zeros(3))  # one site
    # the same proportions: zero up to the add-one smoothing, which fades with the counts
    assert logit_offset([1000, 2000, 3000], [10000, 20000, 30000], 0.5).abs().max() < 1e-3


def test_the_offset_lowers_classes_the_site_lacks_and_raises_those_it_has_too_many_of():
    offset = logit_offset([90, 10, 0], [100, 100, 100], 1.0)
    assert offset[0] > 0 > offset[1] > offset[2]
    assert torch.isfinite(offset).all()  # a class the site never saw: add-one smoothing, no -inf
    assert torch.allclose(logit_offset([90, 10, 0], [100, 100, 100], 0.5), 0.5 * offset)
    assert torch.allclose(log_prior([1, 3]).exp(), torch.tensor([2 / 6, 4 / 6]))


def test_label_counts_cover_every_class_score_of_the_model():
    assert label_counts(torch.tensor([0, 2, 2]), 5) == [1, 0, 2, 0, 0]


def test_mismatched_counts_are_refused():
    with pytest.raises(ValueError, match="3 site counts but 2 federation counts"):
        logit_offset([1, 2, 3], [1, 2], 0.5)


# ---- the training loop -------------------------------------------------------------------

def one_batch_training(logit_offset_given):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    inputs, labels = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    train(model, [(inputs, labels)], 1, 0.1, logit_offset=logit_offset_given)
    return model, inputs, labels


def test_the_loss_sees_the_adjusted_logits():
    offset = torch.tensor([2.0, -1.0, 0.0])
    trained, inputs, labels = one_batch_training(offset)
    torch.manual_seed(0)
    expected = nn.Linear(4, 3)
    optimizer = torch.optim.Adam(expected.parameters(), lr=0.1)
    nn.functional.cross_entropy(adjusted_logits(expected(inputs), offset), labels).backward()
    optimizer.step()
    assert torch.allclose(trained.weight, expected.weight) and torch.allclose(trained.bias, expected.bias)


def test_a_zero_offset_trains_exactly_like_none_and_another_offset_does_not():
    plain, _, _ = one_batch_training(None)
    zero, _, _ = one_batch_training(torch.zeros(3))
    shifted, _, _ = one_batch_training(torch.tensor([2.0, -1.0, 0.0]))
    assert torch.equal(plain.weight, zero.weight)
    assert not torch.allclose(plain.bias, shifted.bias)


# ---- the federation ----------------------------------------------------------------------

@pytest.mark.parametrize("secure", [False, True])
def test_every_site_trains_against_the_federations_summed_counts(tmp_path, secure):
    sites = skewed_sites(tmp_path, secure_aggregation=secure)
    run_rounds(sites)
    own = [site.inputs.label_counts() for site in sites]
    total = [sum(column) for column in zip(*own)]
    assert own[0][2:] == [0, 0] and own[1][:2] == [0, 0]  # the skew the offsets correct
    for site, counts in zip(sites, own):
        assert site.config.logit_adjustment == AUTO_LOGIT_ADJUSTMENT  # auto's default
        assert torch.allclose(site.local.logit_offset, logit_offset(counts, total, AUTO_LOGIT_ADJUSTMENT))
    assert sites[0].local.logit_offset[2] < 0 < sites[0].local.logit_offset[0]


def test_without_it_no_label_counts_leave_the_site(tmp_path):
    sites = skewed_sites(tmp_path, logit_adjustment=0)
    summary = sites[0].codec.decode_report(1, sites[0].summary_message(), "summary")
    assert "label_counts" not in summary
    run_rounds(sites)
    assert all(site.local.logit_offset is None for site in sites)


def test_the_coordinator_refuses_counts_that_do_not_add_up_to_n_train(tmp_path):
    sites = skewed_sites(tmp_path)
    pieces = [(index, site.summary_message()) for index, site in enumerate(sites, start=1)]
    summary = sites[1].codec.decode_report(2, pieces[1][1])
    summary["label_counts"][0] += 5
    pieces[1] = (2, sites[1].codec.encode_report(summary))
    with pytest.raises(SiteMismatchError, match="site 2 sent label_counts with 4 counts adding up to") as error:
        Coordinator(sites[0]).check_summaries(pieces)
    assert error.value.sender == 2


@pytest.mark.parametrize("counts", [[0, 0, 0, 0], [5, 5, 5], [1, -1, 1, 1]])
def test_a_site_refuses_federation_counts_that_cannot_be_the_federations(tmp_path, counts):
    sites = skewed_sites(tmp_path)
    coordinator = Coordinator(sites[0])
    coordinator.check_summaries([(index, site.summary_message()) for index, site in enumerate(sites, start=1)])
    coordinator.label_counts = counts
    with pytest.raises((PeerMessageError, SiteMismatchError), match="label_counts|label counts") as error:
        sites[1].receive_global("coordinator", coordinator.first_global())
    assert error.value.sender == "coordinator"
    assert sites[1].local.logit_offset is None


def summaries_of(label_counts):
    return [(sender, {"n_train": sum(counts), "label_counts": counts})
            for sender, counts in enumerate(label_counts, start=1)]


def test_a_site_claiming_many_samples_of_one_class_moves_the_prior_no_more_than_its_capped_weight():
    honest = [[50, 50, 0], [0, 50, 50]]
    liar = [10 ** 6, 0, 0]
    summaries = summaries_of([*honest, liar])
    assert federation_label_counts(summaries, 3) == [10 ** 6 + 50, 100, 50]  # plain sums: class 0 is ~all
    weights = robust.capped_weights([100, 100, 10 ** 6], 0.5)  # what the averaging gives each
    total = federation_label_counts(summaries, 3, weights)
    prior = torch.tensor(total, dtype=torch.float64) / sum(total)
    # shares 0.25, 0.25, 0.5: p(0) = 0.25 * 0.5 + 0.5 * 1, p(1) = 0.25 * 0.5 + 0.25 * 0.5, p(2) = 0.25 * 0.5
    assert torch.allclose(prior, torch.tensor([0.625, 0.25, 0.125], dtype=torch.float64), atol=1e-6)
    # uncapped weights (no site over the cap) give the plain sums, bit for bit
    assert federation_label_counts(summaries_of(honest * 2), 3, [100] * 4) == [100, 200, 100]


def test_the_coordinator_takes_the_prior_with_the_averaging_weights(tmp_path):
    sites = skewed_sites(tmp_path, robust_aggregation="median")
    coordinator = Coordinator(sites[0])
    coordinator.check_summaries([(index, site.summary_message()) for index, site in enumerate(sites, start=1)])
    summaries = [(index, {"n_train": site.inputs.train_info.n, "label_counts": site.inputs.label_counts()})
                 for index, site in enumerate(sites, start=1)]
    equal = federation_label_counts(summaries, 4, [1, 1, 1])  # median: every site alike
    assert coordinator.label_counts == equal != federation_label_counts(summaries, 4)


# ---- config ------------------------------------------------------------------------------

def test_auto_is_the_default_and_resolves_to_the_measured_strength():
    config = parse_config(BASE)
    assert config.logit_adjustment == "auto"
    resolved, choice = resolve_logit_adjustment(config, train_function_accepts_offset=True)
    assert resolved.logit_adjustment == AUTO_LOGIT_ADJUSTMENT == choice["strength"] and choice["requested"] == "auto"
    resolved, choice = resolve_logit_adjustment(parse_config({**BASE, "logit_adjustment": 1}), True)
    assert resolved.logit_adjustment == 1 and choice["reason"] == "set in config.yml"


def test_auto_is_off_with_dp_and_explicit_strength_with_dp_is_refused():
    config = parse_config({**BASE, "dp": {"epsilon": 3}})
    resolved, choice = resolve_logit_adjustment(config, True)
    assert resolved.logit_adjustment == 0 and "dp is set" in choice["reason"]
    with pytest.raises(InputError, match="dp does not combine with logit_adjustment") as error:
        parse_config({**BASE, "dp": {"epsilon": 3}, "logit_adjustment": 0.5}, "config.yml")
    assert error.value.key == "dp"


def test_a_train_function_without_the_keyword_turns_auto_off_and_refuses_a_strength(tmp_path):
    source = "def train(model, train_loader, epochs, learning_rate):\n    pass\n"
    (tmp_path / "auto").mkdir()
    (tmp_path / "set").mkdir()
    (site,) = sites_with_train_file(tmp_path / "auto", source)
    assert site.config.logit_adjustment == 0
    assert "accepts no logit_offset= keyword" in site.inputs.logit_adjustment_choice["reason"]
    with pytest.raises(InputError, match="logit_offset"):
        sites_with_train_file(tmp_path / "set", source, logit_adjustment=0.5)


def test_a_train_function_with_the_keyword_receives_the_offset(tmp_path):
    source = ("RECEIVED = []\n"
              "def train(model, train_loader, epochs, learning_rate, logit_offset=None):\n"
              "    RECEIVED.append(logit_offset)\n")
    (site,) = sites_with_train_file(tmp_path, source, logit_adjustment=1)
    coordinator = Coordinator(site)
    coordinator.check_summaries([(1, site.summary_message())])
    site.receive_global(1, coordinator.first_global())
    site.start_round()
    site.train_round()
    (received,) = site.local.train_function.__globals__["RECEIVED"]
    assert torch.equal(received, torch.zeros(len(received)))  # one site: its prior is the federation's


@pytest.mark.parametrize("value", [-0.1, 1.5, True, "yes", None])
def test_bad_values_are_refused_naming_config_and_key(value):
    with pytest.raises(InputError, match=r"auto, or a number in \[0, 1\]") as error:
        parse_config({**BASE, "logit_adjustment": value}, "config.yml")
    assert error.value.key == "logit_adjustment" and "config.yml" in str(error.value)
