"""SCAFFOLD (aggregation: scaffold): the gradient correction, the control variates' trip
through the federation, identical globals, config and train-function checks."""
import copy

import pytest
import torch
from torch import nn

from bench.simulate import load_sites, run_rounds
from federation.aggregate import weighted_average
from federation.messages import ModelMessage
from federation.rules import Scaffold
from inputs.config import parse_config
from inputs.errors import InputError
from testbed.split import write_client_dirs
from tests.test_compress import MNIST_MODEL, TINY_CONFIG, receive_own_model
from tests.test_fedprox import sites_with_train_file, small_problem
from training import train
from training.scaffold import ControlVariates

BASE = {"model": "model.py", "train_dataset": "train.pth", "test_dataset": "test.pth"}


def linear_with_gradient(gradient):
    model = nn.Linear(2, 1, bias=False)
    model.weight.grad = torch.tensor([gradient])
    return model


def test_correct_adds_server_minus_local_and_records_the_raw_gradient():
    control = ControlVariates(server={"weight": torch.tensor([[1.0, 2.0]])},
                              local={"weight": torch.tensor([[0.5, -1.0]])})
    first = linear_with_gradient([1.0, 1.0])
    control.correct(first)
    assert torch.equal(first.weight.grad, torch.tensor([[1.5, 4.0]]))  # g + (c - c_i)
    control.correct(linear_with_gradient([3.0, -1.0]))
    # Next c_i: the mean of the raw gradients (1, 1) and (3, -1), not of the corrected ones.
    updated = control.updated_local({"weight": torch.Size([1, 2])})
    assert torch.equal(updated["weight"], torch.tensor([[2.0, 0.0]]))


def test_missing_names_count_as_zeros_and_unused_parameters_get_a_zero_control():
    control = ControlVariates(server={}, local={})
    model = linear_with_gradient([1.0, 2.0])
    control.correct(model)
    assert torch.equal(model.weight.grad, torch.tensor([[1.0, 2.0]]))
    updated = control.updated_local({"weight": torch.Size([1, 2]), "unused": torch.Size([3])})
    assert torch.equal(updated["unused"], torch.zeros(3))


def test_a_train_function_that_never_corrects_is_an_error():
    with pytest.raises(ValueError, match="control.correct"):
        ControlVariates({}, {}).updated_local({"weight": torch.Size([1])})


def test_equal_controls_train_exactly_like_plain_training():
    plain, loader = small_problem()
    corrected = copy.deepcopy(plain)
    same = {name: torch.full(p.shape, 0.3) for name, p in plain.named_parameters()}
    train(plain, loader, epochs=2, learning_rate=0.01)
    train(corrected, loader, epochs=2, learning_rate=0.01, control=ControlVariates(same, same))
    for a, b in zip(plain.parameters(), corrected.parameters()):
        assert torch.equal(a, b)


def test_a_correction_changes_training():
    plain, loader = small_problem()
    corrected = copy.deepcopy(plain)
    server = {name: torch.full(p.shape, 0.5) for name, p in plain.named_parameters()}
    train(plain, loader, epochs=1, learning_rate=0.01)
    train(corrected, loader, epochs=1, learning_rate=0.01, control=ControlVariates(server, {}))
    assert not torch.equal(plain[0].weight, corrected[0].weight)


def test_controls_travel_beside_the_weights_and_average_by_sample_count():
    updates = [ModelMessage({"a": torch.tensor([1.0])}, {}, {"a": torch.tensor([2.0])}),
               ModelMessage({"a": torch.tensor([3.0])}, {}, {"a": torch.tensor([8.0])})]
    assert set(updates[0].joined()) == {"w/a", "c/a"}
    assert ModelMessage.split(updates[1].joined()).controls == updates[1].controls
    assert torch.equal(weighted_average([u.controls for u in updates], [3, 1])["a"], torch.tensor([3.5]))


def test_the_server_takes_the_average_as_it_is():
    averaged = {"a": torch.tensor([1.0])}
    next_global = Scaffold().step({"a": torch.tensor([0.0])}, averaged, ["a"])
    assert next_global == averaged


def simulated_sites(tmp_path, **overrides):
    generator = torch.Generator().manual_seed(1)
    # Label skew: each site sees only two digits, so c_i differ from site to site.
    splits = []
    for site in range(3):
        labels = torch.tensor([2 * site, 2 * site + 1] * 24)
        splits.append((torch.rand(48, 1, 28, 28, generator=generator), labels,
                       torch.rand(16, 1, 28, 28, generator=generator), labels[:16]))
    write_client_dirs(splits, tmp_path / "federation", MNIST_MODEL, TINY_CONFIG)
    clients = sorted((tmp_path / "federation").glob("client_*"))
    return load_sites(clients, tmp_path / "federation" / "generic",
                      {"aggregation": "scaffold", **overrides})


@pytest.mark.parametrize("communication", ["float32", "int8"])
def test_a_federation_keeps_identical_globals_with_the_sites_mean_control(tmp_path, communication):
    sites = simulated_sites(tmp_path, communication=communication)
    run_rounds(sites)
    first = sites[0].codec.last_global
    assert any(name.startswith("c/") for name in first)
    for site in sites[1:]:
        assert first.keys() == site.codec.last_global.keys()
        assert all(torch.equal(first[name], site.codec.last_global[name]) for name in first)
    server_control = ModelMessage.split(first).controls["conv1.weight"]
    local = [site.local.control["conv1.weight"] for site in sites]
    assert not torch.equal(local[0], local[1])  # skewed sites: different gradients
    # c is the sites' mean c_i (equal sample counts); int8 deltas are off by half a step.
    tolerance = 1e-6 if communication == "float32" else 0.02 * server_control.abs().max().item()
    assert torch.allclose(server_control, torch.stack(local).mean(dim=0), atol=tolerance)


def test_scaffold_is_a_valid_aggregation_but_not_with_qat():
    assert parse_config({**BASE, "aggregation": "scaffold"}).aggregation == "scaffold"
    with pytest.raises(InputError, match="aggregation.*qat"):
        parse_config({**BASE, "aggregation": "scaffold", "quant_type": "qat"})


def test_a_train_function_without_control_is_refused(tmp_path):
    source = "def train(model, train_loader, epochs, learning_rate):\n    pass\n"
    with pytest.raises(InputError, match="scaffold.*control="):
        sites_with_train_file(tmp_path, source, aggregation="scaffold")


def test_a_train_function_with_control_receives_the_correction(tmp_path):
    source = ("RECEIVED = []\n"
              "def train(model, train_loader, epochs, learning_rate, control=None):\n"
              "    RECEIVED.append(control)\n")
    (site,) = sites_with_train_file(tmp_path, source, aggregation="scaffold")
    receive_own_model(site)
    site.start_round()
    with pytest.raises(ValueError, match="control.correct"):  # it never corrected a gradient
        site.train_round()
    assert isinstance(site.local.train_function.__globals__["RECEIVED"][-1], ControlVariates)


def quadratic_federation(scales, targets, scaffold, rounds=20, steps=50):
    """Sites minimising 0.5 * scale * (w - target)^2 (per coordinate) with Adam (kept across
    rounds, as the app does), averaged equally each round: the global w after `rounds`."""
    models = [nn.Linear(1, len(targets[0]), bias=False) for _ in targets]
    optimizers = [torch.optim.Adam(model.parameters(), lr=0.01) for model in models]
    global_w, server, locals_ = torch.zeros(len(targets[0])), {}, [{} for _ in targets]
    for _ in range(rounds):
        weights, controls = [], []
        for index, (model, optimizer) in enumerate(zip(models, optimizers)):
            with torch.no_grad():
                model.weight.copy_(global_w.view(-1, 1))
            control = ControlVariates(server, locals_[index]) if scaffold else None
            for _ in range(steps):
                optimizer.zero_grad()
                (0.5 * scales[index] * (model.weight.view(-1) - targets[index]) ** 2).sum().backward()
                if control:
                    control.correct(model)
                optimizer.step()
            if control:
                locals_[index] = control.updated_local({"weight": model.weight.shape})
                controls.append(locals_[index]["weight"])
            weights.append(model.weight.detach().view(-1).clone())
        global_w = torch.stack(weights).mean(0)
        server = {"weight": torch.stack(controls).mean(0)} if scaffold else {}
    return global_w


def test_scaffold_under_adam_reaches_the_federation_optimum_where_fedavg_drifts():
    # The optimum of the summed losses is the scale-weighted mean of the targets. Adam's
    # normalised steps take every FedAvg site most of the way to its own target, so the average
    # lands near the targets' plain (sign-balanced) middle; SCAFFOLD's correction in gradient
    # units (the mean raw gradient as c_i) cancels that drift under Adam too. A correction in
    # the units of Adam's step would land where FedAvg does: keep the gradient units.
    targets = [torch.tensor([1.0, 0.5]), torch.tensor([-1.0, 0.0]), torch.tensor([0.0, -2.0])]
    scales = [torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 100.0])]
    optimum = sum(s * t for s, t in zip(scales, targets)) / sum(scales)  # (0, -1.956)
    scaffold = quadratic_federation(scales, targets, scaffold=True)
    fedavg = quadratic_federation(scales, targets, scaffold=False)
    assert torch.allclose(scaffold, optimum, atol=0.02)
    assert (fedavg - optimum).abs().max() > 1.0  # the drift SCAFFOLD removes
