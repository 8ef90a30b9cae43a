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


def int8_tensors(scripted):
    """Every tensor of a TorchScript int8 model, quantized ones as (int values, scales, zero points)."""
    flat = {}
    for name, value in scripted.state_dict().items():
        if isinstance(value, torch.Tensor) and value.is_quantized:
            flat[name + ".int_repr"] = value.int_repr()
            if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                flat[name + ".scales"] = value.q_per_channel_scales()
                flat[name + ".zero_points"] = value.q_per_channel_zero_points()
            else:
                flat[name + ".scale"] = torch.tensor(value.q_scale())
                flat[name + ".zero_point"] = torch.tensor(value.q_zero_point())
        elif isinstance(value, torch.Tensor):
            flat[name] = value
    return flat


def accuracy_of(model, dataset_file):
    inputs, labels = torch.load(dataset_file, weights_only=True)
    with torch.no_grad():
        predictions = model(inputs).argmax(dim=1)
    return (predictions == labels).float().mean().item()
