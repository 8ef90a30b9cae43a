"""inputs/: loading a site's dataset files, model file and train_function file.

Every error is an InputError whose text names the file and the config key."""
import textwrap

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import Dataset, IterableDataset, Subset, TensorDataset

from inputs import InputError
from inputs.datasets import DatasetInfo, describe_dataset, load_dataset
from inputs.model_file import check_model_on_data, load_model
from inputs.train_function import call_train_function, load_train_function

KEY = "train_dataset"


def images(n, labels=None):
    return torch.rand(n, 1, 4, 4), torch.arange(n) % 3 if labels is None else labels


class DigitsLikeDataset(Dataset):
    """torchvision style: uint8 images and a target list, turned into tensors on access."""

    def __init__(self, n, label_type=np.int64):
        self.data = np.arange(n * 16, dtype=np.uint8).reshape(n, 4, 4)
        self.targets = [label_type(i % 4) for i in range(n)]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        return torch.from_numpy(self.data[index]).float().div(255).unsqueeze(0), self.targets[index]


class CountingStream(IterableDataset):
    def __iter__(self):
        return iter([(torch.zeros(1), 0)])


def load_and_describe(path, key=KEY):
    dataset = load_dataset(path, key)
    return dataset, describe_dataset(dataset, path, key)


# ---------------------------------------------------------------- datasets: happy paths

@pytest.mark.parametrize("content", [
    pytest.param(images(6), id="tuple"),
    pytest.param(list(images(6)), id="list"),
    pytest.param(TensorDataset(*images(6)), id="TensorDataset"),
    pytest.param(Subset(TensorDataset(*images(9, torch.tensor([2, 0, 1, 5, 1, 2, 0, 1, 2]))),
                        [1, 2, 4, 5, 6, 8]), id="Subset"),
])
def test_tensor_datasets_load_and_are_described(tmp_path, content):
    path = tmp_path / "data.pth"
    torch.save(content, path)
    dataset, info = load_and_describe(path)
    assert info == DatasetInfo(n=6, input_shape=(1, 4, 4), n_classes=3, labels=[0, 1, 2])
    sample_input, label = dataset[0]
    assert sample_input.shape == (1, 4, 4) and int(label) in (0, 1, 2)


def test_a_torchvision_style_dataset_class_loads_and_every_label_is_read(tmp_path):
    path = tmp_path / "data.pth"
    torch.save(DigitsLikeDataset(10), path)
    dataset, info = load_and_describe(path)
    assert isinstance(dataset, DigitsLikeDataset)
    assert info == DatasetInfo(n=10, input_shape=(1, 4, 4), n_classes=4, labels=[0, 1, 2, 3])


def test_a_real_torchvision_dataset_with_to_tensor_loads(tmp_path):
    path = tmp_path / "fake.pth"
    torch.save(torchvision.datasets.FakeData(size=12, image_size=(1, 6, 6), num_classes=3,
                                             transform=torchvision.transforms.ToTensor()), path)
    _, info = load_and_describe(path)
    assert info.n == 12 and info.input_shape == (1, 6, 6) and set(info.labels) <= {0, 1, 2}


# ---------------------------------------------------------------- datasets: errors

class FloatLabels(DigitsLikeDataset):
    def __init__(self):
        super().__init__(4, label_type=float)


class RaggedImages(DigitsLikeDataset):
    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        return image[:, : 4 - index % 2], label


def write_bytes(data):
    return lambda path: path.write_bytes(data)


def save(obj):
    return lambda path: torch.save(obj, path)


def save_truncated(path):
    torch.save(images(50), path)
    path.write_bytes(path.read_bytes()[:300])


DATASET_ERRORS = [
    ("missing", lambda path: None, "not found"),
    ("corrupt", write_bytes(b"not a torch file at all" * 20), "cannot be read"),
    ("truncated", save_truncated, "cannot be read"),
    ("dict", save({"x": torch.zeros(2)}), "expected a torch Dataset or an (inputs, labels)"),
    ("three tensors", save(images(3) + (torch.zeros(3),)), "expected (inputs, labels)"),
    ("numpy arrays", save((np.zeros((3, 1, 4, 4)), np.zeros(3))), "neither a torch Dataset nor tensors"),
    ("iterable dataset", save(CountingStream()), "IterableDataset"),
    ("empty tuple", save(images(0)), "empty"),
    ("empty dataset", save(TensorDataset(*images(0))), "empty"),
    ("float labels", save(images(4, torch.tensor([0.0, 1.0, 2.0, 1.0]))), "torch.float32"),
    ("negative labels", save(images(3, torch.tensor([0, -1, 2]))), "include -1"),
    ("one-hot labels", save(images(3, torch.eye(3, dtype=torch.int64))), "not one-hot"),
    ("length mismatch", save((torch.rand(5, 1, 4, 4), torch.arange(4))), "5 inputs but 4 labels"),
    ("integer inputs", save((torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.arange(3))), "floating-point"),
    ("dataset float labels", save(FloatLabels()), "expected an integer class index"),
    ("dataset ragged inputs", save(RaggedImages(3)), "sample 1 has shape"),
    ("dataset PIL images", save(torchvision.datasets.FakeData(size=2, image_size=(1, 6, 6))), "ToTensor"),
]


@pytest.mark.parametrize("write, expected", [pytest.param(w, e, id=name) for name, w, e in DATASET_ERRORS])
def test_bad_dataset_files_raise_input_error_naming_file_and_key(tmp_path, write, expected):
    path = tmp_path / "site_train.pth"
    write(path)
    with pytest.raises(InputError) as caught:
        load_and_describe(path, key="train_dataset")
    message = str(caught.value)
    assert str(path) in message and "train_dataset" in message and expected in message
    assert caught.value.key == "train_dataset"


# ---------------------------------------------------------------- model file

def write_python(tmp_path, source, name="model.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


TINY_MODEL = """
    import dataclasses
    from torch import nn

    @dataclasses.dataclass
    class Settings:  # a dataclass needs its module registered while the file is imported
        width: int = 4

    class Model(nn.Module):
        def __init__(self, n_classes=10, width=Settings().width):
            super().__init__()
            self.layers = nn.Sequential(nn.Flatten(), nn.Linear(16, width), nn.BatchNorm1d(width),
                                        nn.Linear(width, n_classes))

        def forward(self, x):
            return self.layers(x)
"""


def test_model_file_loads_with_kwargs_and_each_load_is_a_fresh_module(tmp_path):
    path = write_python(tmp_path, TINY_MODEL)
    model = load_model(path, kwargs={"n_classes": 3})
    again = load_model(path)
    assert model(torch.rand(2, 1, 4, 4)).shape == (2, 3)
    assert type(model) is not type(again) and type(model).__module__ != type(again).__module__


def test_the_sample_model_file_loads():
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "data" / "sample" / "generic" / "mnist_model.py"
    assert load_model(path)(torch.rand(2, 1, 28, 28)).shape == (2, 10)


MODEL_ERRORS = [
    ("missing", None, {}, "Model", "not found"),
    ("syntax", "from torch import nn\n\nclass Model(nn.Module)\n    pass\n", {}, "Model", "line 3"),
    ("import fails", "import no_such_package_here\n", {}, "Model", "No module named 'no_such_package_here'"),
    ("no such class", "class Net: pass\nclass Helper: pass\n", {}, "Model", "it defines Helper, Net"),
    ("not a module", "class Model: pass\n", {}, "Model", "not a torch.nn.Module subclass"),
    ("needs argument", "from torch import nn\nclass Model(nn.Module):\n    def __init__(self, depth):\n"
                       "        super().__init__()\n", {}, "Model", "needs argument(s) depth"),
    ("unknown kwarg", TINY_MODEL, {"colour": 1}, "Model", "no argument(s) colour"),
    ("constructor raises", "from torch import nn\nclass Model(nn.Module):\n    def __init__(self):\n"
                           "        raise RuntimeError('out of paint')\n", {}, "Model", "out of paint"),
    ("other class name", TINY_MODEL, {}, "LeNet", "no class 'LeNet'"),
]


@pytest.mark.parametrize("source, kwargs, class_name, expected",
                         [pytest.param(*case[1:], id=case[0]) for case in MODEL_ERRORS])
def test_bad_model_files_raise_input_error_naming_file_and_key(tmp_path, source, kwargs, class_name, expected):
    path = tmp_path / "my_model.py" if source is None else write_python(tmp_path, source, "my_model.py")
    with pytest.raises(InputError) as caught:
        load_model(path, class_name=class_name, kwargs=kwargs, key="model")
    message = str(caught.value)
    assert str(path) in message and "'model'" in message and expected in message


def test_model_check_passes_and_leaves_batch_norm_statistics_and_mode_alone(tmp_path):
    path = write_python(tmp_path, TINY_MODEL)
    model = load_model(path).train()
    statistics = model.layers[2].running_mean.clone()
    check_model_on_data(model, torch.rand(5, 1, 4, 4), n_classes=10, model_path=path)
    assert torch.equal(model.layers[2].running_mean, statistics) and model.training


@pytest.mark.parametrize("inputs, n_classes, expected", [
    pytest.param(torch.rand(2, 3, 4, 4), 10, "inputs of shape [2, 3, 4, 4]", id="wrong input shape"),
    pytest.param(torch.rand(2, 1, 4, 4), 12, "expected [2, >= 12]", id="too few outputs"),
])
def test_model_that_does_not_fit_the_data_names_the_shapes(tmp_path, inputs, n_classes, expected):
    path = write_python(tmp_path, TINY_MODEL)
    with pytest.raises(InputError) as caught:
        check_model_on_data(load_model(path), inputs, n_classes=n_classes, model_path=path)
    message = str(caught.value)
    assert str(path) in message and "'model'" in message and expected in message
    if n_classes == 12:
        assert "[2, 10]" in message


# ---------------------------------------------------------------- train_function file

TRAIN_ERRORS = [
    ("missing", None, "not found"),
    ("syntax", "def train(model, loader, epochs, lr)\n    pass\n", "line 1"),
    ("no train", "def fit(model, loader, epochs, lr):\n    pass\n", "defines no function 'train"),
    ("not callable", "train = 3\n", "'train' is a int"),
    ("too few arguments", "def train(model, loader):\n    pass\n", "train must accept"),
]


@pytest.mark.parametrize("source, expected", [pytest.param(*case[1:], id=case[0]) for case in TRAIN_ERRORS])
def test_bad_train_function_files_raise_input_error_naming_file_and_key(tmp_path, source, expected):
    path = tmp_path / "my_train.py" if source is None else write_python(tmp_path, source, "my_train.py")
    with pytest.raises(InputError) as caught:
        load_train_function(path)
    message = str(caught.value)
    assert str(path) in message and "'train_function'" in message and expected in message


SIGNATURE = "def train(model, train_loader, epochs, learning_rate"


@pytest.mark.parametrize("source, received_extras", [
    pytest.param(SIGNATURE + "):\n    return []\n", [], id="required only"),
    pytest.param(SIGNATURE + ", optimizer=None):\n    return [optimizer]\n", ["the optimizer"], id="optimizer"),
    pytest.param(SIGNATURE + ", *, device='gpu'):\n    return [device]\n", ["cpu"], id="keyword-only device"),
    pytest.param(SIGNATURE + ", **options):\n    return sorted(options)\n", ["device", "optimizer"], id="kwargs"),
])
def test_call_train_function_passes_only_the_extras_the_function_accepts(tmp_path, source, received_extras):
    function = load_train_function(write_python(tmp_path, source, "my_train.py"))
    result = call_train_function(function, nn.Linear(1, 1), [], 1, 0.1, optimizer="the optimizer", device="cpu")
    assert result == received_extras
