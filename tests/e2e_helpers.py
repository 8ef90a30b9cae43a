"""Helpers shared by the end-to-end tests: run the testbed, read a site's outputs back."""
import importlib.util
import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
SAMPLE_CLIENTS = [SAMPLE / f"client_{i}" for i in (1, 2, 3)]


def read_metrics(site_dir):
    return json.loads((Path(site_dir) / "metrics.json").read_text())


def load_user_model(model_file, class_name="Model"):
    spec = importlib.util.spec_from_file_location("user_model_for_test", model_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, class_name)()


def int8_tensors(model):
    """Every value that defines an int8 model (eager, FX or TorchScript): its state_dict and each
    layer's packed weight and bias, quantized tensors as int values, scales and zero points,
    plus each layer's output scale and zero point. A scripted model's state_dict alone holds
    almost nothing: its weights live in packed parameters."""
    flat = {}

    def add(key, value):
        if isinstance(value, (tuple, list)):
            for index, item in enumerate(value):
                add(f"{key}.{index}", item)
        elif isinstance(value, torch.Tensor) and value.is_quantized:
            flat[key + ".int_repr"] = value.int_repr()
            if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                flat[key + ".scales"] = value.q_per_channel_scales()
                flat[key + ".zero_points"] = value.q_per_channel_zero_points()
            else:
                flat[key + ".scale"] = torch.tensor(value.q_scale())
                flat[key + ".zero_point"] = torch.tensor(value.q_zero_point())
        else:  # plain tensors, and dtypes / numbers / None inside packed parameters
            flat[key] = value

    for key, value in model.state_dict().items():
        add(key, value)
    for name, module in model.named_modules():
        packed = getattr(module, "_packed_params", None)
        if isinstance(packed, torch.ScriptObject):
            add(f"{name}.packed", packed.unpack()[:2])
        for attribute in ("scale", "zero_point"):
            value = getattr(module, attribute, None)
            if isinstance(value, (int, float)):
                add(f"{name}.{attribute}", value)
    return flat


def assert_identical(first, second):
    """Two int8_tensors results are equal value for value (tensors: dtype and bits)."""
    assert first.keys() == second.keys()
    for key in first:
        if isinstance(first[key], torch.Tensor):
            assert first[key].dtype == second[key].dtype and torch.equal(first[key], second[key]), key
        else:
            assert first[key] == second[key], key


def accuracy_of(model, dataset_file):
    inputs, labels = torch.load(dataset_file, weights_only=True)
    with torch.no_grad():
        predictions = model(inputs).argmax(dim=1)
    return (predictions == labels).float().mean().item()


def make_generic(target, overrides=None, extra_files=None):
    """A copy of the sample's generic dir with config overrides and extra files."""
    import shutil

    import yaml

    target = Path(target)
    shutil.copytree(SAMPLE / "generic", target)
    document = yaml.safe_load((target / "config.yml").read_text())
    document["fc_quantization"].update(overrides or {})
    (target / "config.yml").write_text(yaml.safe_dump(document))
    for name, text in (extra_files or {}).items():
        (target / name).write_text(text)
    return target


def make_client(target, source=SAMPLE_CLIENTS[0], files=None):
    """A copy of a sample client dir with files replaced or added (name -> bytes or text)."""
    import shutil

    target = Path(target)
    shutil.copytree(source, target)
    for name, content in (files or {}).items():
        path = target / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return target


def assert_every_site_holds_the_same_models(site_outputs):
    """fp32 state_dicts and int8 TorchScript models equal, tensor by tensor, at every site."""
    fp32 = [torch.load(site_dir / "model_fp32.pt", weights_only=True) for site_dir in site_outputs]
    int8 = [int8_tensors(torch.jit.load(site_dir / "model_int8.pt")) for site_dir in site_outputs]
    for other_fp32, other_int8 in zip(fp32[1:], int8[1:]):
        assert_identical(fp32[0], other_fp32)
        assert_identical(int8[0], other_int8)


def assert_saved_models_reproduce_the_metrics(client_dirs, site_outputs, backend):
    """model_int8.pt (no model code) and model_fp32.pt (in the user's class, weights_only) give
    the accuracies metrics.json reports, on each site's test set."""
    import pytest

    torch.backends.quantized.engine = backend
    for client_dir, site_dir in zip(client_dirs, site_outputs):
        metrics = read_metrics(site_dir)
        test_file = client_dir / "test_dataset.pth"
        scripted = torch.jit.load(site_dir / "model_int8.pt")
        assert accuracy_of(scripted, test_file) == pytest.approx(metrics["int8"]["accuracy"], abs=1e-6)
        model = load_user_model(SAMPLE / "generic" / "mnist_model.py")
        model.load_state_dict(torch.load(site_dir / "model_fp32.pt", weights_only=True))
        assert accuracy_of(model.eval(), test_file) == pytest.approx(metrics["fp32"]["accuracy"], abs=1e-6)


# Short runs for tests that need the real app but not its accuracy.
QUICK = {"max_iter": 2, "epochs": 1, "calibration_batches": 4}
