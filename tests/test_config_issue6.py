"""Config keys of issue 6: aggregation, server optimizer, mu, device, communication."""
import pytest
import torch

from federation.site import resolve_device
from inputs.config import parse_config
from inputs.errors import InputError

BASE = {"model": "model.py", "train_dataset": "train.pth", "test_dataset": "test.pth"}


def test_defaults_keep_the_earlier_behaviour():
    config = parse_config(BASE)
    assert (config.aggregation, config.mu, config.communication, config.device) == \
        ("fedavg", 0.0, "float32", "auto")
    assert config.server_learning_rate is None
    assert config.server_betas == (0.9, 0.99)


def test_valid_values_are_taken():
    config = parse_config({**BASE, "aggregation": "fedadam", "server_learning_rate": 0.02,
                           "server_momentum": 0.5, "server_betas": [0.8, 0.95], "server_epsilon": 1e-4,
                           "mu": 0.01, "device": "cpu", "communication": "int8"})
    assert config.server_betas == (0.8, 0.95)
    assert config.to_dict()["communication"] == "int8"


@pytest.mark.parametrize("key, value", [
    ("aggregation", "fedyogi"), ("aggregation", None),
    ("server_learning_rate", 0), ("server_learning_rate", -1.0), ("server_learning_rate", True),
    ("server_momentum", 1.0), ("server_momentum", -0.1),
    ("server_betas", [0.9]), ("server_betas", [0.9, 1.0]), ("server_betas", "0.9, 0.99"),
    ("server_betas", [True, 0.9]),
    ("server_epsilon", 0), ("mu", -0.01), ("mu", "0.1"),
    ("device", "gpu"), ("device", "cuda:0"), ("communication", "int4"), ("communication", "float16"),
])
def test_invalid_values_name_the_key(key, value):
    with pytest.raises(InputError) as caught:
        parse_config({**BASE, key: value})
    assert key in str(caught.value)


def test_cuda_without_a_gpu_is_an_input_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="device.*no GPU"):
        resolve_device("cuda", "config.yml")
    assert resolve_device("auto", "config.yml") == "cpu"
    assert resolve_device("cpu", "config.yml") == "cpu"


def test_auto_takes_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", "config.yml") == "cuda"
    assert resolve_device("cpu", "config.yml") == "cpu"
