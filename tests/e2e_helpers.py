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


# Short runs for tests that need the real app but not its accuracy.
QUICK = {"max_iter": 2, "epochs": 1, "calibration_batches": 4}
