"""FedProx in the default train loop, and how the Site passes the round's global weights."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from inputs.errors import InputError
from tests.test_compress import receive_own_model, tiny_federation
from training import train
from training.loop import proximal_term


def small_problem(seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(64, 5, generator=generator)
    labels = (inputs[:, 0] > 0).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
    return model, DataLoader(TensorDataset(inputs, labels), batch_size=16, shuffle=False)


def distance(model, weights):
    return sum((p - weights[n]).square().sum() for n, p in model.named_parameters()).sqrt().item()


def global_weights_of(model):
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def test_mu_zero_is_plain_training():
    plain, loader = small_problem()
    proximal = copy.deepcopy(plain)
    train(plain, loader, epochs=2, learning_rate=0.01)
    train(proximal, loader, epochs=2, learning_rate=0.01, mu=0.0, global_weights=global_weights_of(proximal))
    for a, b in zip(plain.parameters(), proximal.parameters()):
        assert torch.equal(a, b)


def test_mu_pulls_toward_the_global_weights():
    distances = {}
    for mu in (0.0, 1.0, 10.0):
        model, loader = small_problem()
        start = global_weights_of(model)
        train(model, loader, epochs=3, learning_rate=0.05, mu=mu, global_weights=start)
        distances[mu] = distance(model, start)
    assert distances[10.0] < distances[1.0] < distances[0.0]


def test_proximal_term_value():
    model, _ = small_problem()
    shifted = {name: value + 0.5 for name, value in global_weights_of(model).items()}
    n_parameters = sum(p.numel() for p in model.parameters())
    # mu/2 * sum of 0.5^2 over every parameter
    assert proximal_term(model, shifted, 0.2).item() == pytest.approx(0.1 * 0.25 * n_parameters)


def test_mu_without_global_weights_is_refused():
    model, loader = small_problem()
    with pytest.raises(ValueError, match="global_weights"):
        train(model, loader, epochs=1, learning_rate=0.01, mu=0.1)


RECORDING_TRAIN = '''
RECEIVED = []

def train(model, train_loader, epochs, learning_rate, device="cpu", mu=0.0, global_weights=None):
    RECEIVED.append({"device": device, "mu": mu, "global_weights": global_weights,
                     "at_start": {n: p.detach().clone() for n, p in model.named_parameters()}})
    for parameter in model.parameters():
        parameter.data.add_(0.1)
'''


def sites_with_train_file(tmp_path, source, **config):
    train_file = tmp_path / "recording_train.py"
    train_file.write_text(source)
    return tiny_federation(tmp_path / "run", n_sites=1, extra_files=[train_file],
                           train_function=train_file.name, **config)


def test_site_passes_the_rounds_global_weights_and_device(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (site,) = sites_with_train_file(tmp_path, RECORDING_TRAIN, mu=0.05, device="auto")
    receive_own_model(site)
    site.start_round()
    site.train_round()
    received = site.local.train_function.__globals__["RECEIVED"][-1]
    assert received["device"] == "cpu" and received["mu"] == 0.05
    for name, value in received["at_start"].items():
        assert torch.equal(received["global_weights"][name], value)
    assert next(site.local.model.parameters()).device.type == "cpu"


def test_mu_with_a_train_function_without_the_keywords_is_refused(tmp_path):
    source = "def train(model, train_loader, epochs, learning_rate):\n    pass\n"
    with pytest.raises(InputError, match="mu: 0.05"):
        sites_with_train_file(tmp_path, source, mu=0.05)
