"""learning_rate_schedule: cosine lowers the local learning rate round by round, at every site,
for the kept optimizer and for a custom train function alike (inputs/config.py, Site.start_round)."""
import math

import pytest

from bench.simulate import load_sites, run_rounds
from inputs.config import parse_config
from inputs.errors import InputError
from tests.privacy_helpers import make_tiny_federation
from training import train

BASE = {"model": "m.py", "train_dataset": "train.pth", "test_dataset": "test.pth"}


def test_cosine_falls_from_the_full_rate_to_a_small_one():
    config = parse_config({**BASE, "learning_rate": 0.01, "max_iter": 4, "learning_rate_schedule": "cosine"})
    rates = [config.round_learning_rate(r) for r in range(1, 5)]
    expected = [0.01 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)]
    assert rates == pytest.approx(expected)
    assert rates[0] == 0.01 and rates[2] == pytest.approx(0.005)
    assert all(later < earlier for earlier, later in zip(rates, rates[1:])) and rates[-1] > 0


def test_constant_is_the_default_and_keeps_the_rate():
    config = parse_config({**BASE, "learning_rate": 0.01, "max_iter": 4})
    assert config.learning_rate_schedule == "constant"
    assert [config.round_learning_rate(r) for r in range(1, 5)] == [0.01] * 4


@pytest.mark.parametrize("change, key, text", [
    ({"learning_rate_schedule": "step"}, "learning_rate_schedule", "constant, cosine"),
    ({"learning_rate_schedule": "cosine", "dp": {"epsilon": 1}}, "dp", "dp's own learning_rate"),
])
def test_bad_schedules_name_the_key(change, key, text):
    with pytest.raises(InputError) as error:
        parse_config({**BASE, **change}, "in/config.yml")
    assert error.value.key == key
    assert "in/config.yml" in str(error.value) and text in str(error.value)


def record_rates(site, seen):
    """Wrap `site`'s train function: record the learning rate it is called with and the one
    its optimizer steps at."""
    def recording(model, train_loader, epochs, learning_rate, optimizer=None, **extras):
        stepping = optimizer.param_groups[0]["lr"] if optimizer is not None else learning_rate
        seen.append((learning_rate, stepping))
        return train(model, train_loader, epochs, learning_rate, optimizer=optimizer, **extras)
    site.local.train_function = recording


@pytest.mark.parametrize("keep_optimizer_state", [True, False])
def test_every_round_trains_at_its_scheduled_rate(tmp_path, keep_optimizer_state):
    clients, generic = make_tiny_federation(tmp_path, max_iter=3, learning_rate=0.03,
                                            learning_rate_schedule="cosine",
                                            keep_optimizer_state=keep_optimizer_state)
    sites = load_sites(clients, generic)
    seen = {index: [] for index in range(len(sites))}
    for index, site in enumerate(sites):
        record_rates(site, seen[index])
    run_rounds(sites)
    expected = [0.03 * (1 + math.cos(math.pi * k / 3)) / 2 for k in range(3)]
    for rates in seen.values():
        assert [called for called, _ in rates] == pytest.approx(expected)
        # The kept optimizer (Adam's moments carried over) steps at the round's rate too.
        assert [stepping for _, stepping in rates] == pytest.approx(expected)
