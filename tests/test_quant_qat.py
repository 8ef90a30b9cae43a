"""QAT across sites, unit level: back to the user's class, ranges that only training moves,
and a QAT federation (weights averaged, ranges merged) ending in one int8 model."""

import copy

import pytest
import torch
from torch import nn

import quant
from federation.aggregate import weighted_average
from tests.test_quant_models import BnResidualNet, BranchingNet, LeNet, image_batches


def _train_steps(prepared, batches, lr=0.05):
    optimizer = torch.optim.SGD(prepared.parameters(), lr=lr)
    prepared.train()
    for batch in batches:
        optimizer.zero_grad()
        quant.forward_quant(prepared, batch).square().mean().backward()
        optimizer.step()


def _without_fake_quant(prepared):
    """The prepared model computing in float: what the float model must reproduce."""
    plain = copy.deepcopy(prepared).eval()
    plain.apply(torch.ao.quantization.disable_fake_quant)
    return plain


@pytest.mark.parametrize("model_class,mode", [(BnResidualNet, "fx"), (BranchingNet, "eager"), (LeNet, "fx")])
def test_to_float_model_holds_the_qat_trained_weights_and_batchnorm(model_class, mode):
    torch.manual_seed(0)
    model = model_class()
    batches = image_batches((1, 28, 28))
    prepared = quant.prepare_qat(model, (batches[0],), "x86")
    _train_steps(prepared, batches)
    float_model = quant.to_float_model(prepared, model)

    assert quant.mode_of(prepared) == mode and type(float_model) is model_class
    assert float_model.state_dict().keys() == model.state_dict().keys()
    # trained: the weights and the BatchNorm running statistics moved away from the original
    changed = [k for k, v in float_model.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, model.state_dict()[k])]
    assert any(k.endswith("running_mean") for k in changed) or not any(
        isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(k.endswith("weight") for k in changed)
    with torch.no_grad():
        expected = _without_fake_quant(prepared)(batches[0])
        assert torch.allclose(float_model.eval()(batches[0]), expected, rtol=1e-4, atol=1e-4)


def test_to_float_model_saves_and_loads_with_weights_only(tmp_path):
    model = BnResidualNet()
    prepared = quant.prepare_qat(model, (image_batches((1, 28, 28))[0],), "fbgemm")
    torch.save(quant.to_float_model(prepared, model).state_dict(), tmp_path / "model_fp32.pt")
    fresh = BnResidualNet()
    fresh.load_state_dict(torch.load(tmp_path / "model_fp32.pt", weights_only=True))


def test_to_float_model_refuses_a_post_training_prepared_model():
    model = BnResidualNet()
    prepared = quant.prepare_ptq(model.eval(), (image_batches((1, 28, 28))[0],), "x86")
    with pytest.raises(quant.QuantizationError, match="to_float_model.*bn1"):
        quant.to_float_model(prepared, model)


@pytest.mark.parametrize("model_class", [BnResidualNet, BranchingNet])
def test_evaluating_a_qat_model_does_not_move_its_ranges(model_class):
    batches = image_batches((1, 28, 28))
    prepared = quant.prepare_qat(model_class(), (batches[0],), "x86")
    quant.forward_quant(prepared, batches[0])
    before = quant.observer_stats(prepared)
    prepared.eval()
    with torch.no_grad():
        quant.forward_quant(prepared, batches[1] * 10)
    assert all(torch.equal(before[k], v) for k, v in quant.observer_stats(prepared).items())
    prepared.train()  # observers still follow the training data afterwards
    quant.forward_quant(prepared, batches[1] * 10)
    assert not all(torch.equal(before[k], v) for k, v in quant.observer_stats(prepared).items())


def _int8_state(int8_model):
    state = {}
    for key, value in int8_model.state_dict().items():
        if isinstance(value, torch.Tensor) and value.is_quantized:
            state[key] = (value.int_repr(), value.dequantize())
        elif isinstance(value, torch.Tensor):
            state[key] = (value,)
        elif isinstance(value, tuple):  # packed params: (weight, bias)
            state[key] = tuple(v.dequantize() if v.is_quantized else v for v in value if isinstance(v, torch.Tensor))
    return state


def test_qat_federation_ends_with_one_int8_model_at_every_site():
    """Sites train the fake-quantized model on their own data, weights are averaged and
    ranges merged each round (integer flags never averaged), then every site converts."""
    torch.manual_seed(0)
    model = BnResidualNet()
    sites = [quant.prepare_qat(model, (image_batches((1, 28, 28))[0],), "x86") for _ in range(3)]
    for round_number in (1, 2, 3):
        for index, prepared in enumerate(sites):
            quant.freeze_qat(prepared, observers=round_number >= 3, batchnorm=round_number >= 2)
            _train_steps(prepared, image_batches((1, 28, 28), count=2, seed=10 * round_number + index))
        site_ranges = [quant.observer_stats(p) for p in sites]
        weights = weighted_average([quant.float_state(p) for p in sites], [100, 200, 300])
        ranges = quant.merge_calibration(site_ranges)
        assert not any(k.endswith(("observer_enabled", "fake_quant_enabled")) for k in weights)
        # merged, not averaged: the federation's range covers every site's range
        for key in (k for k in ranges if k.endswith("min_val")):
            assert torch.equal(ranges[key], torch.stack([s[key] for s in site_ranges]).amin(dim=0))
        for prepared in sites:
            quant.load_float_state(prepared, weights)
            quant.load_observer_stats(prepared, ranges)
    site_stats = [quant.observer_stats(p) for p in sites]
    int8_models = [quant.convert(p) for p in sites]
    first = _int8_state(int8_models[0])
    for other in int8_models[1:]:
        state = _int8_state(other)
        assert state.keys() == first.keys()
        assert all(all(torch.equal(a, b) for a, b in zip(first[k], state[k])) for k in first)
    assert all(torch.equal(site_stats[0][k], s[k]) for s in site_stats for k in s)
    flags = [v for k, v in sites[0].state_dict().items() if k.endswith("observer_enabled")]
    assert flags and all(int(f) == 0 for f in flags)
