"""dp noise: distributed: DP-SGD on the union of the sites' data, one secure sum per step, each
site adding only its share of the noise (training/privacy.py, federation/secure.py)."""
import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from bench.simulate import load_sites, quantize_sites, run_rounds
from federation.checks import UpdateError
from federation.messages import memo_kind, round_memo
from federation.secure import SecureSite
from inputs.config import parse_config
from inputs.errors import InputError
from testbed.relay import fixed_point_sum, smpc_sum
from tests.e2e_helpers import assert_identical, int8_tensors
from tests.privacy_helpers import SIZES, make_tiny_federation
from training import make_loader
from training.privacy import (DistributedDPSGD, DistributedPlan, DPSettings, NoisyGradientDescent,
                              PrivacyError, distributed_plan, rdp_epsilon)

pytestmark = pytest.mark.timeout(120)
BASE = {"model": "m.py", "train_dataset": "a.pth", "test_dataset": "b.pth"}
DISTRIBUTED = {"epsilon": 4, "noise": "distributed", "batch_size": 64}


def test_distributed_noise_needs_secure_aggregation():
    with pytest.raises(InputError, match="needs secure_aggregation: true") as error:
        parse_config({**BASE, "dp": DISTRIBUTED}, "config.yml")
    assert error.value.key == "dp" and "config.yml" in str(error.value)
    with pytest.raises(InputError, match="would step a second time") as error:
        parse_config({**BASE, "dp": DISTRIBUTED, "secure_aggregation": True, "aggregation": "fedavgm"})
    assert error.value.key == "dp"
    config = parse_config({**BASE, "dp": DISTRIBUTED, "secure_aggregation": True})
    assert DPSettings.from_config(config.dp).distributed
    assert parse_config({**BASE, "dp": {"epsilon": 4}}).dp["noise"] == "local"
    with pytest.raises(InputError, match="noise: local or distributed, colluding_sites: whole number >= 0 or all}, got"):
        parse_config({**BASE, "dp": {"epsilon": 4, "noise": "central"}, "secure_aggregation": True})


def test_the_plan_spends_the_budget_over_every_step_of_the_union():
    settings = DPSettings(3.0, 1e-5, 1.0, batch_size=128, learning_rate=0.05, noise="distributed")
    plan = distributed_plan(settings, n_train_total=3600, n_sites=3, rounds=5, epochs=2)
    assert plan.sample_rate == pytest.approx(128 / 3600) and plan.expected_batch == pytest.approx(128)
    assert plan.steps_per_round == round(2 * 3600 / 128) and plan.total_steps == 5 * plan.steps_per_round
    spent = rdp_epsilon(plan.noise_multiplier, plan.sample_rate, plan.total_steps, 1e-5)
    assert 0.97 * 3.0 <= spent <= 3.0 * 1.001
    assert plan.share_multiplier == pytest.approx(plan.noise_multiplier / math.sqrt(3))
    # One site's share alone protects far less: what is left if the others collude.
    assert rdp_epsilon(plan.share_multiplier, plan.sample_rate, plan.total_steps, 1e-5) > 2 * spent


def test_a_contribution_is_the_clipped_gradient_sum_plus_the_noise_share():
    """At sampling rate 1 every record is in the batch: the contribution minus the sum of
    per-sample gradients clipped to C (computed here by hand) is the noise, whose standard
    deviation is the share sigma * C / sqrt(n_sites)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))
    inputs, labels = torch.randn(40, 20) * 3, torch.randint(0, 5, (40,))
    loader = make_loader(torch.utils.data.TensorDataset(inputs, labels), 8, shuffle=False, seed=0)
    clip = 0.5
    plan = DistributedPlan(sample_rate=1.0, expected_batch=40, steps_per_round=1, total_steps=1,
                           noise_multiplier=2.0, n_sites=4)
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for x, y in zip(inputs, labels):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[None]), y[None]).backward()
        norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
        for name, p in model.named_parameters():
            expected[name] += p.grad * min(1.0, clip / (norm.item() + 1e-6))
    private = DistributedDPSGD(model, loader, DPSettings(1.0, 1e-5, clip, 40, 0.05, "distributed"), plan)
    contribution = private.noisy_gradient_sum()
    noise = torch.cat([(contribution[name] - expected[name]).flatten() for name in expected])
    assert noise.std().item() == pytest.approx(2.0 * clip / math.sqrt(4), rel=0.05)
    assert abs(noise.mean().item()) < 0.05
    assert private.report()["steps"] == 1 and private.report()["noise"] == "distributed"
    private.close()
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_the_coordinators_step_is_sgd_with_momentum_on_the_mean():
    torch.manual_seed(1)
    weights = {"a": torch.randn(3, 2), "b": torch.randn(4), "buffer": torch.ones(2)}
    reference = {name: tensor.clone().requires_grad_() for name, tensor in weights.items() if name != "buffer"}
    sgd = torch.optim.SGD(list(reference.values()), lr=0.05, momentum=0.9)
    descent = NoisyGradientDescent(DPSettings(1.0, 1e-5, 1.0, 32, 0.05, "distributed"), expected_batch=32)
    for _ in range(4):
        sums = {name: torch.randn_like(tensor) * 32 for name, tensor in reference.items()}
        weights = descent.step(weights, sums)
        for name, tensor in reference.items():
            tensor.grad = sums[name] / 32
        sgd.step()
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor.detach())
    assert torch.equal(weights["buffer"], torch.ones(2))


def test_the_fast_fixed_point_sum_is_the_controllers_sum():
    rng = np.random.default_rng(0)
    vectors = [list(rng.normal(0, 50, 300)) + [0.0, -1e4, 1e4] for _ in range(3)]
    payloads = [json.dumps(vector).encode() for vector in vectors]
    for exponent in (5, 14):
        assert json.loads(fixed_point_sum(payloads, exponent)) == json.loads(smpc_sum(payloads, exponent))
    with pytest.raises(ValueError, match="differ in shape"):
        fixed_point_sum([b"[1, 2]", b"[1]"], 5)
    with pytest.raises(ValueError, match="not finite or beyond"):
        fixed_point_sum([b"[1, Infinity]", b"[1, 2]"], 5)
    with pytest.raises(ValueError, match="not finite or beyond"):
        fixed_point_sum([b"[1e15, 2]", b"[1, 2]"], 5)


def test_a_federation_trains_on_noisy_sums_and_every_site_ends_identical(tmp_path):
    dp = {"epsilon": 8, "noise": "distributed", "batch_size": 32, "learning_rate": 0.5}
    clients, generic = make_tiny_federation(tmp_path, dp=dp, secure_aggregation=True, max_iter=2, epochs=2,
                                            validation_fraction=0)
    sites = load_sites(clients, generic)
    result = run_rounds(sites)
    n_total = sum(SIZES)
    steps_per_round = round(2 * n_total / 32)
    figures = quantize_sites(sites)
    reports = [site.dp_report for site in sites]
    for report in reports:
        assert report["noise"] == "distributed" and report["steps"] == 2 * steps_per_round
        assert report["sample_rate"] == pytest.approx(32 / n_total)
        assert 0.9 * 8 <= report["epsilon_spent"] <= 8 * 1.001
        assert report["epsilon_if_peers_collude"] > report["epsilon_spent"]
        assert report["noise_multiplier_own_share"] == pytest.approx(report["noise_multiplier"] / math.sqrt(3))
    int8 = [int8_tensors(site.recipe.int8_model) for site in sites]
    for other in int8[1:]:
        assert_identical(int8[0], other)
    # The tiny task is learnable: DP-SGD on the union must beat chance (4 classes) clearly.
    assert figures["fp32"]["accuracy"] > 0.5 and len(result["rounds"]) == 2
    # Each step costs a model-sized JSON vector from every site and a model broadcast.
    n_parameters = sum(p.numel() for p in sites[0].local.model.parameters())
    assert result["bytes_per_round"] > steps_per_round * 3 * n_parameters * 5


def test_step_memos_are_accounted_under_their_round():
    assert memo_kind("dp_sum_3_17") == "dp_sum" and memo_kind("update_3") == "update"
    assert round_memo("dp_sum_3_17") == "dp_sum_3" and round_memo("update_3") == "update_3"
    assert round_memo("calibration") == "calibration"


def test_a_site_sending_more_than_its_clipped_gradients_stops_the_run(tmp_path, monkeypatch):
    """The coordinator cannot see whose contribution it was, but a sum beyond what clipped
    gradients plus the noise can reach is refused instead of being stepped on."""
    clients, generic = make_tiny_federation(tmp_path, dp={**DISTRIBUTED, "batch_size": 32}, secure_aggregation=True,
                                            max_iter=1, epochs=1, validation_fraction=0)
    sites = load_sites(clients, generic)
    honest = SecureSite.dp_sum

    def hostile(self, memo):
        contribution = honest(self, memo)
        if self.site is sites[1] and memo.endswith("_3"):  # two honest steps first
            contribution.vector = [value + 10.0 for value in contribution.vector]
        return contribution

    monkeypatch.setattr(SecureSite, "dp_sum", hostile)
    with pytest.raises(UpdateError, match=r"dp_sum_1_3' has norm .* a site sent more than its clipped gradient sum"):
        run_rounds(sites)


def test_with_full_batches_and_almost_no_noise_it_is_centralized_dp_sgd(tmp_path):
    """End to end through the sites, the secure sums and the coordinator: at sampling rate 1
    (dp.batch_size >= N) and epsilon 1e5 (noise multiplier 0.003), two steps of distributed
    DP-SGD give the weights of two full-batch steps of clipped SGD with momentum on the union,
    computed here by hand."""
    dp = {"epsilon": 1e5, "noise": "distributed", "batch_size": 10_000, "learning_rate": 0.5, "max_grad_norm": 0.1}
    clients, generic = make_tiny_federation(tmp_path, dp=dp, secure_aggregation=True, max_iter=1, epochs=2,
                                            validation_fraction=0)
    sites = load_sites(clients, generic)
    model = copy.deepcopy(sites[0].local.model)  # the coordinator's initial weights are global_0
    inputs = torch.cat([site.inputs.train_loader.dataset.tensors[0] for site in sites])
    labels = torch.cat([site.inputs.train_loader.dataset.tensors[1] for site in sites])
    run_rounds(sites)
    sgd = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(2):
        clipped = [torch.zeros_like(p) for p in model.parameters()]
        for x, y in zip(inputs, labels):
            model.zero_grad()
            nn.functional.cross_entropy(model(x[None]), y[None]).backward()
            norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
            for total, p in zip(clipped, model.parameters()):
                total += p.grad * min(1.0, 0.1 / (norm + 1e-6))
        for total, p in zip(clipped, model.parameters()):
            p.grad = total / len(labels)
        sgd.step()
    assert sites[1].local.private.steps == 2
    for (name, expected), trained in zip(model.named_parameters(), sites[1].local.model.parameters()):
        torch.testing.assert_close(trained, expected.detach(), atol=2e-4, rtol=1e-3, msg=name)


# ---- dp.colluding_sites ------------------------------------------------------------------------

def test_colluding_sites_is_checked_in_config_yml():
    secure = {**BASE, "secure_aggregation": True}
    for value in (0, 2, "all"):
        assert parse_config({**secure, "dp": {**DISTRIBUTED, "colluding_sites": value}}).dp["colluding_sites"] == value
    assert parse_config({**secure, "dp": DISTRIBUTED}).dp["colluding_sites"] == 0
    for value in (-1, 1.5, True, "some"):
        with pytest.raises(InputError, match=r"colluding_sites must be a whole number >= 0 or all\)$") as error:
            parse_config({**secure, "dp": {**DISTRIBUTED, "colluding_sites": value}}, "config.yml")
        assert error.value.key == "dp"
    with pytest.raises(InputError, match="applies to noise: distributed only") as error:
        parse_config({**BASE, "dp": {"epsilon": 4, "colluding_sites": "all"}}, "config.yml")
    assert error.value.key == "dp" and "config.yml" in str(error.value)


def test_colluding_sites_raise_each_share_so_that_the_honest_ones_make_up_sigma():
    base = DPSettings(3.0, 1e-5, 1.0, batch_size=128, learning_rate=0.05, noise="distributed")
    plain = distributed_plan(base, n_train_total=3600, n_sites=3, rounds=5, epochs=2)
    one = distributed_plan(DPSettings(**{**base.__dict__, "colluding_sites": 1}), 3600, 3, 5, 2)
    every = distributed_plan(DPSettings(**{**base.__dict__, "colluding_sites": "all"}), 3600, 3, 5, 2)
    # The same sigma (the same schedule and budget); the shares grow.
    assert one.noise_multiplier == every.noise_multiplier == plain.noise_multiplier
    assert plain.sum_multiplier == pytest.approx(plain.noise_multiplier)
    assert one.share_multiplier == pytest.approx(plain.noise_multiplier / math.sqrt(2))
    assert every.colluding_sites == 2 and every.share_multiplier == pytest.approx(plain.noise_multiplier)
    assert every.sum_multiplier == pytest.approx(plain.noise_multiplier * math.sqrt(3))
    # Two honest shares of `one` make up sigma: the budget holds against the coordinator and
    # one colluding site; with "all", one site's own share does.
    spent = rdp_epsilon(plain.noise_multiplier, plain.sample_rate, plain.total_steps, 1e-5)
    assert rdp_epsilon(one.share_multiplier * math.sqrt(2), one.sample_rate, one.total_steps, 1e-5) == \
        pytest.approx(spent)
    assert rdp_epsilon(every.share_multiplier, every.sample_rate, every.total_steps, 1e-5) == pytest.approx(spent)
    with pytest.raises(PrivacyError, match="colluding_sites 3 must be below the number of sites, 3"):
        distributed_plan(DPSettings(**{**base.__dict__, "colluding_sites": 3}), 3600, 3, 5, 2)


def test_a_site_refuses_more_colluding_sites_than_the_federation_has(tmp_path):
    dp = {**DISTRIBUTED, "colluding_sites": 3}
    clients, generic = make_tiny_federation(tmp_path, dp=dp, secure_aggregation=True, max_iter=1)
    site = load_sites(clients[:1], generic)[0]
    with pytest.raises(InputError, match="colluding_sites 3 must be below the number of sites, 3") as error:
        SecureSite(site, n_sites=3)
    assert error.value.key == "dp" and error.value.file.endswith("config.yml")
    SecureSite(site, n_sites=4)  # one honest site left: allowed


def test_with_every_site_colluding_each_share_is_private_by_itself(tmp_path):
    """colluding_sites: all: every contribution carries the whole sigma, the sum sqrt(3) x it;
    the honest sums pass the coordinator's bound, and the report says what holds."""
    dp = {"epsilon": 8, "noise": "distributed", "batch_size": 32, "learning_rate": 0.5, "colluding_sites": "all"}
    clients, generic = make_tiny_federation(tmp_path, dp=dp, secure_aggregation=True, max_iter=2, epochs=1,
                                            validation_fraction=0)
    sites = load_sites(clients, generic)
    run_rounds(sites)
    figures = quantize_sites(sites)
    for site in sites:
        report = site.dp_report
        assert report["colluding_sites"] == 2
        assert report["noise_multiplier_own_share"] == pytest.approx(report["noise_multiplier"])
        assert report["noise_multiplier_sum"] == pytest.approx(report["noise_multiplier"] * math.sqrt(3))
        assert 0.9 * 8 <= report["epsilon_spent"] <= 8 * 1.001
        assert report["epsilon_if_peers_collude"] == pytest.approx(report["epsilon_spent"])
    assert figures["fp32"]["accuracy"] > 0.4  # learnable despite sqrt(3) x the noise (4 classes)
    from outputs.report import _privacy_section
    section = _privacy_section({"secure_aggregation": True, "dp": sites[0].dp_report})
    assert "Colluding sites the guarantee holds against</th><td>2<" in section
    assert "no more than 2 of them pool" in section
