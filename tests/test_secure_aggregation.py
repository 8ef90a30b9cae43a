"""Secure aggregation: config refusals, fixed-point bounds, the controller's secret shares, and
a tiny federation whose secure run matches the plain one (in one process, bench/simulate.py)."""
import json

import numpy as np
import pytest
import torch

import quant
from bench.simulate import load_sites, quantize_sites, run_rounds
from federation.messages import ModelMessage
from federation.secure import (INT64_LIMIT, WEIGHT_BOUND, SecureAggregationError, SecureSite,
                               checked_vector, exponent_for)
from inputs.config import parse_config
from inputs.errors import InputError
from testbed.relay import MODULUS, smpc_sum
from tests.privacy_helpers import make_tiny_federation

pytestmark = pytest.mark.timeout(60)
BASE = {"model": "m.py", "train_dataset": "a.pth", "test_dataset": "b.pth"}


@pytest.mark.parametrize("extra, words", [
    ({"communication": "int8"}, "communication: int8"),
    ({"quant_type": "qat"}, "quant_type: qat"),
])
def test_settings_that_cannot_be_summed_are_refused(extra, words):
    with pytest.raises(InputError) as error:
        parse_config({**BASE, "secure_aggregation": True, **extra}, "config.yml")
    assert error.value.key == "secure_aggregation"
    assert words in str(error.value) and "config.yml" in str(error.value)


def test_robust_aggregation_other_than_none_is_refused():
    with pytest.raises(InputError, match="robust aggregation"):
        parse_config({**BASE, "secure_aggregation": True, "robust_aggregation": "median"}, "config.yml")
    assert parse_config({**BASE, "secure_aggregation": True, "robust_aggregation": "none"}).secure_aggregation


def test_secure_aggregation_defaults_to_off():
    assert parse_config(dict(BASE)).secure_aggregation is False
    with pytest.raises(InputError, match="true or false"):
        parse_config({**BASE, "secure_aggregation": "yes"})


@pytest.mark.parametrize("n_sites", [2, 3, 10, 900])
def test_exponent_keeps_every_fixed_point_sum_inside_int64(n_sites):
    exponent = exponent_for(WEIGHT_BOUND, n_sites)
    assert n_sites * WEIGHT_BOUND * 10 ** exponent < INT64_LIMIT
    assert exponent == 15 or n_sites * WEIGHT_BOUND * 10 ** (exponent + 1) >= INT64_LIMIT
    assert exponent >= 12  # float32 resolution of weights above 1e-5 with room to spare


def test_a_value_beyond_the_bound_is_refused_at_the_site():
    assert checked_vector([1.0, -WEIGHT_BOUND], WEIGHT_BOUND, "w") == [1.0, -WEIGHT_BOUND]
    with pytest.raises(SecureAggregationError, match="beyond the fixed-point bound"):
        checked_vector([0.5, 2 * WEIGHT_BOUND], WEIGHT_BOUND, "this site's update")
    with pytest.raises(SecureAggregationError):
        checked_vector([float("nan")], WEIGHT_BOUND, "w")


def test_secret_shares_look_random_and_combine_to_the_exact_sum():
    values = [[0.0] * 2000, [1.25] * 2000, [-3.5] * 2000]
    shares = []
    total = json.loads(smpc_sum([json.dumps(v).encode() for v in values], exponent=8, shares_out=shares))
    assert total == [-2.25] * 2000
    assert len(shares) == 3 and all(len(site) == 3 for site in shares)
    zero_site_shares = shares[0]
    for share in zero_site_shares:  # shares of zeros: uniform in [0, 2^64), not zero
        array = np.array(share, dtype=float)
        assert 0.4 < array.mean() / MODULUS < 0.6
        assert len(set(share)) == len(share)
    # One share of a site says nothing about its values: they differ from the fixed-point ones.
    assert all(share[0] != 125000000 for share in shares[1])


def test_the_site_refuses_an_update_beyond_the_bound(tmp_path):
    clients, generic = make_tiny_federation(tmp_path, secure_aggregation=True)
    site = load_sites(clients[:1], generic)[0]
    secure = SecureSite(site, n_sites=3)
    secure.n_train_total = 288
    message = site.local_message()
    huge = {name: value.clone() for name, value in message.weights.items()}
    huge["fc2.bias"][0] = 1e6
    # SCAFFOLD's control variates (aggregation: auto) travel in the same sum as the weights.
    site.train_round_message = lambda: ModelMessage(huge, controls=message.controls,
                                                    meta={"n_train": 96, "train_loss": 1.0, "train_accuracy": 0.5})
    with pytest.raises(SecureAggregationError, match="bound"):
        secure.update("update_1")


def test_secure_run_matches_the_plain_run(tmp_path):
    clients, generic = make_tiny_federation(tmp_path)
    results, models = {}, {}
    for secure in (False, True):
        sites = load_sites(clients, generic, {"secure_aggregation": secure})
        rows = run_rounds(sites)["rounds"]
        figures = quantize_sites(sites)
        results[secure] = (rows, figures)
        models[secure] = [site.local.model.state_dict() for site in sites]
        int8 = [site.recipe.int8_model.state_dict() for site in sites]
        for other in int8[1:]:  # every site holds the same int8 model
            for key, value in int8[0].items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value.int_repr() if value.is_quantized else value,
                                       other[key].int_repr() if other[key].is_quantized else other[key]), key
    (plain_rows, plain), (secure_rows, secure) = results[False], results[True]
    for plain_row, secure_row in zip(plain_rows, secure_rows):
        for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "validation_loss",
                    "validation_accuracy"):
            assert secure_row[key] == pytest.approx(plain_row[key], abs=1e-4)
    for name, value in models[False][0].items():
        assert torch.allclose(models[True][0][name], value, atol=1e-6), name
    assert secure["fp32"]["accuracy"] == pytest.approx(plain["fp32"]["accuracy"], abs=1e-4)
    assert abs(secure["int8"]["accuracy"] - plain["int8"]["accuracy"]) <= 1 / 144 + 1e-6  # one test sample
    assert (secure["n_sites"], secure["n_train"], secure["n_test"]) == (3, 259, 144)


@pytest.mark.timeout(300)
def test_the_pt2e_backend_calibrates_from_sums_and_every_site_writes_the_same_files(tmp_path):
    """backend: xnnpack: its per-channel weight observers keep only a range, but they see only the
    global weights (the same at every site), so they stay at each site; the activations'
    histograms are summed as with x86."""
    clients, generic = make_tiny_federation(tmp_path)
    sites = load_sites(clients, generic, {"secure_aggregation": True, "backend": "xnnpack"})
    run_rounds(sites)
    figures = quantize_sites(sites)
    weight_observers = quant.weight_observer_paths(sites[0].recipe.prepared)
    assert len(weight_observers) == 3  # conv, fc1, fc2
    assert not any(key.rpartition(".")[0] in weight_observers for key in sites[0].own_stats)
    digests = [tuple(artifact["digest"] for artifact in site.artifacts) for site in sites]
    assert len(digests[0]) == 3 and len(set(digests)) == 1  # .pte, .onnx, .pt2: the same at every site
    assert figures["n_sites"] == 3 and figures["int8"]["accuracy"] >= figures["fp32"]["accuracy"] - 2 / 144
    for artifact in figures["artifacts"]:  # each file in its own runtime, over every test set
        assert artifact["accuracy"] == pytest.approx(figures["int8"]["accuracy"], abs=1 / 144 + 1e-6)
