"""Every kind of bad input is caught before any training, with an error naming file and key/problem.

Each case builds one site's input dir (the sample's client_1 merged with the generic dir), breaks
one thing, and loads the site as the `initial` state does.
"""
import io
import shutil

import pytest
import torch
import yaml

from federation.site import Site
from inputs.errors import InputError
from tests.e2e_helpers import REPO, SAMPLE, SAMPLE_CLIENTS

CUSTOM_TRAIN = REPO / "tests" / "fixtures" / "custom_train" / "train.py"


def site_dir(tmp_path):
    target = tmp_path / "input"
    shutil.copytree(SAMPLE / "generic", target)
    shutil.copytree(SAMPLE_CLIENTS[0], target, dirs_exist_ok=True)
    return target


def set_config(directory, **changes):
    document = yaml.safe_load((directory / "config.yml").read_text())
    section = document["fc_quantization"]
    for key, value in changes.items():
        if value is DELETE:
            section.pop(key)
        else:
            section[key] = value
    (directory / "config.yml").write_text(yaml.safe_dump(document))


DELETE = object()


def saved(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write(name, content):
    def apply(directory):
        path = directory / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return apply


def remove(name):
    return lambda directory: (directory / name).unlink()


def config(**changes):
    return lambda directory: set_config(directory, **changes)


def truncate(name):
    def apply(directory):
        data = (directory / name).read_bytes()
        (directory / name).write_bytes(data[: len(data) // 2])
    return apply


TRAIN_X, TRAIN_Y = torch.load(SAMPLE_CLIENTS[0] / "train_dataset.pth", weights_only=True)
MODEL_NEEDS_ARG = "import torch\nclass Model(torch.nn.Module):\n    def __init__(self, width):\n        super().__init__()\n"
MODEL_WRONG_INPUT = ("import torch\nclass Model(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                     "        self.fc = torch.nn.Linear(10, 10)\n    def forward(self, x):\n        return self.fc(x)\n")
MODEL_FIVE_OUTPUTS = MODEL_WRONG_INPUT.replace("Linear(10, 10)", "Linear(784, 5)").replace("self.fc(x)", "self.fc(x.flatten(1))")

CASES = {
    # config.yml
    "config missing": (remove("config.yml"), "config.yml", "config file not found"),
    "config syntax": (write("config.yml", "fc_quantization: [oops\n"), "config.yml", "not valid YAML"),
    "required key": (config(model=DELETE), "config.yml", "key 'model': required key is missing"),
    "wrong type": (config(epochs="two"), "config.yml", "key 'epochs': must be a number > 0"),
    "batch_size 0": (config(batch_size=0), "config.yml", "key 'batch_size': must be an integer >= 1, got 0"),
    "negative lr": (config(learning_rate=-0.1), "config.yml", "key 'learning_rate': must be a number > 0"),
    "epochs 0": (config(epochs=0), "config.yml", "key 'epochs'"),
    "max_iter 0": (config(max_iter=0), "config.yml", "key 'max_iter'"),
    "unknown backend": (config(backend="cuda"), "config.yml", "key 'backend': must be one of fbgemm, qnnpack, x86"),
    "unknown quant_type": (config(quant_type="dynamic"), "config.yml", "key 'quant_type': must be one of post_static, qat"),
    "unknown key": (config(epoch=3), "config.yml", "unknown key(s) epoch; known keys: model, train_dataset"),
    # the model file
    "model missing": (remove("mnist_model.py"), "mnist_model.py", "key 'model': file not found"),
    "model syntax": (write("mnist_model.py", "class Model(:\n"), "mnist_model.py", "syntax error on line 1"),
    "no such class": (config(model_class="Net"), "mnist_model.py", "no class 'Net'"),
    "constructor args": (write("mnist_model.py", MODEL_NEEDS_ARG), "mnist_model.py", "needs argument(s) width"),
    "forward fails": (write("mnist_model.py", MODEL_WRONG_INPUT), "mnist_model.py", "inputs of shape [32, 1, 28, 28]"),
    "output shape": (write("mnist_model.py", MODEL_FIVE_OUTPUTS), "mnist_model.py", "output has shape [32, 5]"),
    # datasets
    "train missing": (remove("train_dataset.pth"), "train_dataset.pth", "key 'train_dataset': file not found"),
    "test corrupt": (write("test_dataset.pth", b"not a torch file at all"), "test_dataset.pth", "cannot be read"),
    "train truncated": (truncate("train_dataset.pth"), "train_dataset.pth", "cannot be read"),
    "unsupported object": (write("train_dataset.pth", saved({"x": TRAIN_X})), "train_dataset.pth", "holds a dict"),
    "empty": (write("train_dataset.pth", saved((TRAIN_X[:0], TRAIN_Y[:0]))), "train_dataset.pth", "empty"),
    "float labels": (write("train_dataset.pth", saved((TRAIN_X, TRAIN_Y.float()))), "train_dataset.pth",
                     "expected integer class indices"),
    "negative labels": (write("test_dataset.pth", saved((TRAIN_X[:10], TRAIN_Y[:10] - 5))), "test_dataset.pth",
                        "class indices start at 0"),
    "train/test shapes differ": (write("test_dataset.pth", saved((torch.zeros(8, 1, 14, 14), TRAIN_Y[:8]))),
                                 "test_dataset.pth", "key 'test_dataset': inputs have shape (1, 14, 14)"),
    # train_function
    "train_function missing": (config(train_function="my_train.py"), "my_train.py",
                               "key 'train_function': file not found"),
    "train_function lacks train": (lambda d: (write("my_train.py", "def fit(model):\n    pass\n")(d),
                                             set_config(d, train_function="my_train.py")),
                                   "my_train.py", "defines no function 'train("),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_named(case, tmp_path):
    break_it, file_name, text = CASES[case]
    directory = site_dir(tmp_path)
    break_it(directory)
    with pytest.raises(InputError) as error:
        Site.load(directory)
    message = str(error.value)
    assert file_name in message and text in message, message
    assert len(error.value.short) <= 40


def test_auto_aggregation_falls_back_to_fedavg_for_a_train_function_without_control(tmp_path):
    # The public contract: a train(model, train_loader, epochs, learning_rate) written before
    # SCAFFOLD keeps working under the default aggregation: auto.
    directory = site_dir(tmp_path)
    (directory / "my_train.py").write_text(CUSTOM_TRAIN.read_text())
    set_config(directory, train_function="my_train.py")
    site = Site.load(directory)
    assert site.config.aggregation == "fedavg" and not site.local.scaffold
    assert site.inputs.aggregation_choice["requested"] == "auto"
    assert not site.local_message().controls


def test_auto_aggregation_is_scaffold_for_the_sample_site(tmp_path):
    site = Site.load(site_dir(tmp_path))
    assert site.config.aggregation == "scaffold" and site.local.scaffold
    # the payload limit (states.Initial) is taken from this message: it carries the controls
    message = site.local_message()
    assert set(message.controls) == {name for name, _ in site.local.model.named_parameters()}


def test_sample_site_loads(tmp_path):
    site = Site.load(site_dir(tmp_path))
    assert site.inputs.summary() == {"n_train": 1200, "n_test": 334, "input_shape": [1, 28, 28], "n_classes": 10}
