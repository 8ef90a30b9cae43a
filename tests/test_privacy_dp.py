"""Sample-level DP-SGD (training/privacy.py, Opacus): config, refusals, accounting, the run."""
import copy

import pytest
import torch
from torch import nn

from bench.simulate import load_sites, quantize_sites, run_rounds
from inputs.config import parse_config
from inputs.errors import InputError
from training import make_loader, train
from training.privacy import DPSettings, PrivacyError, PrivateTraining, check_model
from tests.privacy_helpers import make_tiny_federation

pytestmark = pytest.mark.timeout(60)
BASE = {"model": "m.py", "train_dataset": "a.pth", "test_dataset": "b.pth"}


def test_dp_settings_and_defaults():
    config = parse_config({**BASE, "dp": {"epsilon": 3}})
    assert config.dp == {"epsilon": 3, "delta": 1e-5, "max_grad_norm": 1.0, "batch_size": 128, "learning_rate": 0.05,
                         "noise": "local", "colluding_sites": 0}
    settings = DPSettings.from_config(parse_config({**BASE, "dp": {"epsilon": 3, "batch_size": 64}}).dp)
    assert (settings.batch_size, settings.learning_rate) == (64, 0.05)
    assert parse_config(dict(BASE)).dp is None


@pytest.mark.parametrize("dp", [{"epsilon": 0}, {"epsilon": 1, "delta": 1}, {"epsilon": 1, "max_grad_norm": -1},
                                {"epsilon": 1, "sigma": 2}, {"delta": 1e-5}, "yes",
                                {"epsilon": 1, "batch_size": 0}, {"epsilon": 1, "batch_size": 3.5},
                                {"epsilon": 1, "learning_rate": 0}])
def test_bad_dp_settings_are_refused(dp):
    with pytest.raises(InputError) as error:
        parse_config({**BASE, "dp": dp})
    assert error.value.key == "dp"


@pytest.mark.parametrize("extra, words", [
    ({"quant_type": "qat"}, "QAT's fused fake-quantized layers"),
    ({"train_function": "t.py"}, "cannot guarantee"),
    ({"aggregation": "scaffold"}, "control variates"),
    ({"mu": 0.01}, "proximal"),
])
def test_combinations_dp_cannot_guarantee_are_refused(extra, words):
    with pytest.raises(InputError, match=words) as error:
        parse_config({**BASE, "dp": {"epsilon": 3}, **extra}, "config.yml")
    assert error.value.key == "dp"


def test_batchnorm_gets_a_clear_error_naming_the_layer(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, 4))
    with pytest.raises(PrivacyError, match="BatchNorm") as error:
        check_model(model)
    assert "layer '1' (BatchNorm2d)" in str(error.value)
    clients, generic = make_tiny_federation(tmp_path, dp={"epsilon": 3})
    (generic / "model.py").write_text((generic / "model.py").read_text().replace(
        "self.relu1 = nn.ReLU()", "self.relu1 = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU())"))
    with pytest.raises(InputError, match="BatchNorm") as error:
        load_sites(clients[:1], generic)
    assert error.value.key == "dp" and "model.py" in str(error.value)
    assert "layer 'relu1.0' (BatchNorm2d)" in str(error.value)


def _tiny_loader():
    generator = torch.Generator().manual_seed(0)
    inputs, labels = torch.randn(200, 6, generator=generator), torch.randint(0, 3, (200,), generator=generator)
    return make_loader(torch.utils.data.TensorDataset(inputs, labels), 20, shuffle=True, seed=0)


def test_the_whole_run_stays_within_the_budget(epsilon=2.0):
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    settings = DPSettings(epsilon, 1e-5, 1.0)
    private = PrivateTraining(model, torch.optim.Adam(model.parameters(), lr=0.01), _tiny_loader(), settings,
                              total_epochs=6)
    for _ in range(3):  # 3 rounds x 2 epochs = the 6 planned
        private.train(train, 2, 0.01, "cpu")
    report = private.report()
    assert report["steps"] == 6 * 10  # every step accounted (sampling rate 1/10)
    assert 0.8 * epsilon <= report["epsilon_spent"] <= epsilon * 1.001
    assert report["noise_multiplier"] > 0.3
    private.close()
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())
    copy.deepcopy(model)  # quantization copies the model: nothing of Opacus is left in it


def test_noise_is_calibrated_for_every_step_at_the_dp_batch_rate(epsilon=2.0):
    """The noise multiplier comes from all rounds x epochs at rate dp batch / n_train (not one
    round's steps, not the loader's batch), and the full run spends most of the budget."""
    from opacus.accountants.utils import get_noise_multiplier

    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    settings = DPSettings(epsilon, 1e-5, 1.0, batch_size=40, learning_rate=0.05)
    private = PrivateTraining(model, torch.optim.SGD(model.parameters(), lr=0.05), _tiny_loader(), settings,
                              total_epochs=8)
    assert private.sample_rate == pytest.approx(40 / 200)  # the loader's batch is 20
    expected = get_noise_multiplier(target_epsilon=epsilon, target_delta=1e-5, sample_rate=0.2, steps=8 * 5,
                                    accountant="rdp")
    one_round = get_noise_multiplier(target_epsilon=epsilon, target_delta=1e-5, sample_rate=0.2, steps=2 * 5,
                                     accountant="rdp")
    assert private.noise_multiplier == pytest.approx(expected, rel=0.01) and private.noise_multiplier > 1.3 * one_round
    for _ in range(4):  # 4 rounds x 2 epochs = the 8 planned
        private.train(train, 2, 0.05, "cpu")
    assert private.steps == 8 * 5
    assert 0.8 * epsilon < private.epsilon_spent() <= epsilon * 1.001


def test_a_site_trains_dp_with_sgd_momentum_at_the_dp_learning_rate(tmp_path):
    clients, generic = make_tiny_federation(tmp_path, dp={"epsilon": 4, "learning_rate": 0.07}, max_iter=1)
    (site,) = load_sites(clients[:1], generic)
    run_rounds([site])
    optimizer = site.local.private.optimizer.original_optimizer
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["lr"] == 0.07 and optimizer.param_groups[0]["momentum"] == 0.9


def test_clipping_bounds_every_samples_influence():
    """With max_grad_norm C, noise and lr fixed, one SGD step moves the weights by at most
    lr * (C * batch + noise) / expected batch: huge inputs do not make a huge step."""
    model = nn.Linear(6, 3)
    loader = make_loader(torch.utils.data.TensorDataset(torch.randn(200, 6) * 1e4, torch.randint(0, 3, (200,))),
                         20, shuffle=True, seed=0)
    private = PrivateTraining(model, torch.optim.SGD(model.parameters(), lr=1.0), loader,
                              DPSettings(1e6, 1e-5, 0.01), total_epochs=1)  # ~no noise
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    private.train(train, 1, 1.0, "cpu")
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    steps = private.report()["steps"]
    assert (after - before).norm() <= steps * 0.01 * 2.5  # clipped (x ~2: Poisson batch sizes)


def test_federated_dp_with_secure_aggregation_reports_epsilon(tmp_path):
    clients, generic = make_tiny_federation(tmp_path, dp={"epsilon": 4, "delta": 1e-4}, secure_aggregation=True,
                                            max_iter=1)
    sites = load_sites(clients[:2], generic)
    run_rounds(sites)
    figures = quantize_sites(sites)
    for site in sites:
        report = site.dp_report
        assert 0 < report["epsilon_spent"] <= 4 * 1.001 and report["delta"] == 1e-4
        n_train = len(site.inputs.train_loader.dataset)
        assert report["steps"] > 0 and report["sample_rate"] == pytest.approx(min(1, 128 / n_train), rel=0.05)
    assert 0 <= figures["int8"]["accuracy"] <= 1


def test_report_shows_the_spent_epsilon():
    from outputs.report import _privacy_section

    dp = {"epsilon_target": 3.0, "delta": 1e-5, "max_grad_norm": 1.0, "noise_multiplier": 1.07,
          "sample_rate": 0.024, "steps": 420, "epsilon_spent": 2.998}
    section = _privacy_section({"secure_aggregation": False, "dp": dp})
    assert "id='dp'" in section and "2.998" in section and "Not covered" in section
    assert _privacy_section(None) == ""


def test_half_epochs_spend_the_budget_over_twice_the_rounds(epsilon=2.0):
    """epochs: 0.5 under DP: each round takes half of the Poisson loader's steps, and the run's
    6 rounds x 0.5 epochs are the 3 planned epochs, accounted in full."""
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    settings = DPSettings(epsilon, 1e-5, 1.0)
    private = PrivateTraining(model, torch.optim.SGD(model.parameters(), lr=0.05), _tiny_loader(), settings,
                              total_epochs=3)
    steps = []
    for _ in range(6):
        before = private.steps
        private.train(train, 0.5, 0.05, "cpu")
        steps.append(private.steps - before)
    assert steps == [5] * 6  # 10 steps per epoch (rate 1/10)
    assert 0.8 * epsilon <= private.epsilon_spent() <= epsilon * 1.001
