"""float_output_layer: the layer whose output is the model's output stays in float, so the
logits are not rounded to 8 bits (FX and PT2E), and the federation still ends with one model."""
import pytest
import torch
from torch import nn

import quant
from bench.simulate import load_sites, quantize_sites, run_rounds
from inputs.config import parse_config
from inputs.errors import InputError
from tests.privacy_helpers import make_tiny_federation
from tests.test_quant_models import BranchingNet, LeNet, image_batches

pytestmark = pytest.mark.timeout(120)


class SoftmaxNet(LeNet):
    def forward(self, x):
        return torch.softmax(super().forward(x), dim=1)


def _int8_outputs(backend, float_layers, batches):
    prepared = quant.prepare_ptq(LeNet().eval(), (batches[0],), backend, float_layers)
    quant.calibrate(prepared, batches, len(batches))
    with torch.no_grad():
        return quant.forward_quant(quant.convert(prepared), torch.cat(batches))


def test_the_output_layer_is_the_one_whose_output_the_model_returns():
    example = (image_batches((1, 28, 28))[0],)
    assert quant.float_output_layer(LeNet(), example, "x86") == "fc3"
    assert quant.float_output_layer(LeNet(), example, "xnnpack") == "fc3"
    model = LeNet().train()
    quant.float_output_layer(model, example, "x86")
    assert model.training  # its mode is restored
    with pytest.raises(quant.QuantizationError, match="float_output_layer.*SoftmaxNet.*not the output of a Linear"):
        quant.float_output_layer(SoftmaxNet(), example, "x86")
    with pytest.raises(quant.QuantizationError, match="only in a model torch.fx can trace.*BranchingNet"):
        quant.float_output_layer(BranchingNet(), example, "x86")
    with pytest.raises(quant.QuantizationError, match="float_output_layer: Model fails on one example input: RuntimeError"):
        quant.float_output_layer(LeNet(), (torch.rand(1, 3, 28, 28),), "x86")  # wrong channels


@pytest.mark.parametrize("backend", ["x86", "xnnpack"])
def test_the_float_output_layer_keeps_the_logits_off_the_8_bit_grid(backend):
    """8-bit logits take at most 256 values; float ones as many as there are logits."""
    batches = image_batches((1, 28, 28), count=4, batch=32)
    rounded, kept = _int8_outputs(backend, (), batches), _int8_outputs(backend, ("fc3",), batches)
    assert len(torch.unique(rounded)) <= 256 < len(torch.unique(kept))
    # the layers before stay int8: the float-output model is not the fp32 model
    with torch.no_grad():
        assert not torch.allclose(kept, LeNet().eval()(torch.cat(batches)))


def test_eager_mode_cannot_leave_a_layer_in_float():
    example = (image_batches((1, 28, 28))[0],)
    with pytest.raises(quant.QuantizationError, match=r"float layers \['fc'\] need a model that torch.fx can trace"):
        quant.prepare_ptq(BranchingNet().eval(), example, "x86", ("fc",))


def test_config_takes_true_false_or_auto_which_means_with_dp():
    base = {"model": "m.py", "train_dataset": "a.pth", "test_dataset": "b.pth"}
    assert parse_config(base).float_output_layer == "auto"
    assert not parse_config(base).wants_float_output_layer
    assert parse_config({**base, "dp": {"epsilon": 3}}).wants_float_output_layer
    assert not parse_config({**base, "dp": {"epsilon": 3}, "float_output_layer": False}).wants_float_output_layer
    assert parse_config({**base, "float_output_layer": True}).wants_float_output_layer
    for bad in ("yes", 1):
        with pytest.raises(InputError, match="float_output_layer") as error:
            parse_config({**base, "float_output_layer": bad}, "config.yml")
        assert error.value.key == "float_output_layer"


SOFTMAX_TAIL = "\n\nclass Model(Model):\n    def forward(self, x):\n        return torch.softmax(super().forward(x), 1)\n"


def test_a_model_without_an_output_layer_is_refused_at_start_only_when_required(tmp_path):
    clients, generic = make_tiny_federation(tmp_path)
    (site,) = load_sites(clients[:1], generic, {"dp": {"epsilon": 3}})  # auto: on with dp
    assert site.recipe.float_layers == ("fc2",)
    (generic / "model.py").write_text((generic / "model.py").read_text() + SOFTMAX_TAIL)
    with pytest.raises(InputError, match="float_output_layer.*not the output of a Linear") as error:
        load_sites(clients[:1], generic, {"float_output_layer": True})
    assert error.value.key == "float_output_layer" and "config.yml" in str(error.value)
    (site,) = load_sites(clients[:1], generic, {"dp": {"epsilon": 3}})  # auto: quantizes everything
    assert site.recipe.float_layers == ()


def test_a_federation_ends_with_the_same_model_its_output_layer_in_float(tmp_path):
    clients, generic = make_tiny_federation(tmp_path)
    sites = load_sites(clients, generic, {"float_output_layer": True})
    run_rounds(sites)
    figures = quantize_sites(sites)
    assert {site.recipe.float_layers for site in sites} == {("fc2",)}
    assert all(type(site.recipe.int8_model.fc2) is nn.Linear for site in sites)  # FX: a float Linear
    assert len({tuple(a["digest"] for a in site.artifacts) for site in sites}) == 1
    assert figures["int8"]["accuracy"] >= figures["fp32"]["accuracy"] - 2 / 144


def test_xnnpack_files_keep_the_output_layer_in_float_in_their_runtimes(tmp_path):
    """.pte (ExecuTorch), .onnx (onnxruntime), .pt2: the float layer survives lowering."""
    batches = image_batches((1, 28, 28), count=4, batch=32)
    prepared = quant.prepare_ptq(LeNet().eval(), (batches[0],), "xnnpack", ("fc3",))
    quant.calibrate(prepared, batches, len(batches))
    int8_model = quant.convert(prepared)
    paths = quant.write_artifacts(int8_model, (batches[0],), tmp_path, "xnnpack")
    inputs = torch.cat(batches)
    with torch.no_grad():
        reference = quant.forward_quant(int8_model, inputs)
    for path in paths.values():
        outputs = quant.load_artifact(path)(inputs)
        assert len(torch.unique(outputs)) > 256, path.name
        # the runtimes' int8 kernels may round an activation one step differently
        assert torch.allclose(outputs, reference, atol=0.02 * float(reference.abs().max())), path.name
        assert (outputs.argmax(dim=1) == reference.argmax(dim=1)).float().mean() >= 0.95, path.name


def test_qat_trains_the_float_layer_in_float_and_maps_it_back():
    torch.manual_seed(0)
    batches = image_batches((1, 28, 28), count=2, batch=16)
    model = LeNet()
    prepared = quant.prepare_qat(model, (batches[0],), "x86", ("fc3",))
    assert type(prepared.fc3) is nn.Linear  # no fake quantization on it
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.01)
    for batch in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(quant.forward_quant(prepared, batch), torch.arange(16) % 10).backward()
        optimizer.step()
    trained = quant.to_float_model(prepared, model)
    assert torch.equal(trained.fc3.weight, prepared.fc3.weight)
    with torch.no_grad():
        outputs = quant.forward_quant(quant.convert(prepared), torch.cat(batches))
    assert len(torch.unique(outputs)) > 256
