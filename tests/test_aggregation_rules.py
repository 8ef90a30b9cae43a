"""federation.rules: FedAvg / FedAvgM / FedAdam / Scaffold steps on tiny tensors."""
import pytest
import torch

from federation.rules import RULES, FedAdam, FedAvg, FedAvgM, rule_from_config
from inputs.config import parse_config

PARAMETERS = ["layer.weight"]


def state(weight, running_mean=0.0, batches=0):
    """A tiny state: one parameter, one BatchNorm statistic, one integer counter."""
    return {"layer.weight": torch.tensor(weight, dtype=torch.float32),
            "bn.running_mean": torch.tensor([running_mean]),
            "bn.num_batches_tracked": torch.tensor(batches)}


def test_fedavg_returns_the_average_unchanged():
    averaged = state([0.3, -0.7], running_mean=2.0, batches=5)
    result = FedAvg().step(state([1.0, 1.0]), averaged, PARAMETERS)
    for name, tensor in averaged.items():
        assert torch.equal(result[name], tensor)


def test_fedavgm_accumulates_momentum_across_rounds():
    server = FedAvgM(learning_rate=0.5, momentum=0.9)
    first = server.step(state([0.0, 0.0]), state([1.0, -2.0]), PARAMETERS)
    # velocity = delta = [1, -2]; step = 0.5 * velocity
    assert torch.allclose(first["layer.weight"], torch.tensor([0.5, -1.0]))
    second = server.step(first, state([1.5, -1.0]), PARAMETERS)
    # delta = [1, 0]; velocity = 0.9 * [1, -2] + [1, 0] = [1.9, -1.8]
    assert torch.allclose(second["layer.weight"], torch.tensor([0.5 + 0.95, -1.0 - 0.9]))


def test_fedavgm_without_momentum_at_rate_one_is_fedavg():
    server = FedAvgM(learning_rate=1.0, momentum=0.0)
    previous = state([0.25, 4.0])
    for target in ([1.0, 3.0], [0.5, -1.0]):
        previous = server.step(previous, state(target), PARAMETERS)
        assert torch.allclose(previous["layer.weight"], torch.tensor(target))


def test_fedadam_follows_reddi_et_al():
    beta1, beta2, epsilon, rate = 0.9, 0.99, 1e-3, 0.1
    server = FedAdam(learning_rate=rate, betas=(beta1, beta2), epsilon=epsilon)
    previous, deltas = torch.tensor([0.0, 1.0]), [torch.tensor([0.2, -0.05]), torch.tensor([0.1, 0.3])]
    first, second, weights = torch.zeros(2), torch.zeros(2), previous.clone()
    current = state(previous.tolist())
    for delta in deltas:
        first = beta1 * first + (1 - beta1) * delta
        second = beta2 * second + (1 - beta2) * delta ** 2
        weights = weights + rate * first / (second.sqrt() + epsilon)
        averaged = state((current["layer.weight"] + delta).tolist())
        current = server.step(current, averaged, PARAMETERS)
        assert torch.allclose(current["layer.weight"], weights, atol=1e-6)


@pytest.mark.parametrize("aggregation", ["fedavgm", "fedadam"])
def test_statistics_and_counters_keep_their_averaged_value(aggregation):
    averaged = state([1.0, 1.0], running_mean=3.5, batches=7)
    result = RULES[aggregation](learning_rate=0.5).step(state([0.0, 0.0]), averaged, PARAMETERS)
    assert torch.equal(result["bn.running_mean"], averaged["bn.running_mean"])
    assert torch.equal(result["bn.num_batches_tracked"], averaged["bn.num_batches_tracked"])
    assert not torch.equal(result["layer.weight"], averaged["layer.weight"])


def test_a_parameter_new_this_round_takes_the_average():
    averaged = {**state([1.0, 1.0]), "new.weight": torch.tensor([2.0])}
    result = FedAdam().step(state([0.0, 0.0]), averaged, PARAMETERS + ["new.weight"])
    assert torch.equal(result["new.weight"], averaged["new.weight"])


def test_dtype_is_kept():
    result = FedAvgM().step(state([0.0, 0.0]), state([1.0, 1.0]), PARAMETERS)
    assert result["layer.weight"].dtype == torch.float32


def test_from_config_takes_the_keys_and_the_aggregations_default_rate():
    base = {"model": "m.py", "train_dataset": "a.pth", "test_dataset": "b.pth"}
    adam = rule_from_config(parse_config({**base, "aggregation": "fedadam",
                                                     "server_betas": [0.8, 0.9]}))
    assert isinstance(adam, FedAdam) and adam.learning_rate == FedAdam.default_learning_rate
    assert adam.betas == (0.8, 0.9)
    momentum = rule_from_config(parse_config({**base, "aggregation": "fedavgm",
                                                         "server_learning_rate": 0.3,
                                                         "server_momentum": 0.5}))
    assert (momentum.learning_rate, momentum.momentum) == (0.3, 0.5)


def test_unknown_aggregation_is_refused_by_the_config():
    base = {"model": "m.py", "train_dataset": "a.pth", "test_dataset": "b.pth"}
    with pytest.raises(ValueError, match="fedyogi"):
        parse_config({**base, "aggregation": "fedyogi"})


@pytest.mark.parametrize("aggregation", ["fedavg", "scaffold"])
def test_server_learning_rate_scales_the_step_of_fedavg_and_scaffold(aggregation):
    base = {"model": "m.py", "train_dataset": "a.pth", "test_dataset": "b.pth"}
    rule = rule_from_config(parse_config({**base, "aggregation": aggregation, "server_learning_rate": 2.0}))
    result = rule.step(state([1.0, 1.0]), state([2.0, 0.0], running_mean=3.0), PARAMETERS)
    assert torch.equal(result["layer.weight"], torch.tensor([3.0, -1.0]))  # 1 + 2 * (avg - 1)
    assert torch.equal(result["bn.running_mean"], torch.tensor([3.0]))      # statistics: the average


def test_server_momentum_is_fedavgms_by_default_and_scaffolds_when_set():
    base = {"model": "m.py", "train_dataset": "a.pth", "test_dataset": "b.pth"}
    rule = lambda **keys: rule_from_config(parse_config({**base, **keys}))  # noqa: E731
    assert rule(aggregation="fedavgm").momentum == 0.3
    plain = rule(aggregation="scaffold")
    assert plain.momentum == 0.0 and plain.is_identity
    averaged = state([0.3, -0.7], running_mean=2.0, batches=5)
    assert all(torch.equal(plain.step(state([1.0, 1.0]), averaged, PARAMETERS)[name], tensor)
               for name, tensor in averaged.items())  # the average, bit for bit
    with_momentum = rule(aggregation="scaffold", server_momentum=0.5)
    first = with_momentum.step(state([0.0, 0.0]), state([1.0, -2.0]), PARAMETERS)
    second = with_momentum.step(first, state([2.0, -2.0]), PARAMETERS)
    # delta [1, 0]; velocity 0.5 * [1, -2] + [1, 0] = [1.5, -1]
    assert torch.allclose(second["layer.weight"], torch.tensor([2.5, -3.0]))
