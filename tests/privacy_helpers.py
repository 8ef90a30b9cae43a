"""A tiny federation (3 sites, 8x8 images, 4 classes, a small CNN) for the privacy tests: the
real app's code paths in seconds instead of the sample's minutes."""
from pathlib import Path

import torch
import yaml

TINY_MODEL = '''
import torch
from torch import nn


class Model(nn.Module):
    def __init__(self, n_classes: int = 4):
        super().__init__()
        # 8 channels and 32 units, not 4 and 16: under DP noise the narrower net's ReLUs died
        # (1-3 of its 4 conv channels, most hidden units) in about 1 run in 60, near chance.
        self.conv = nn.Conv2d(1, 8, kernel_size=3)     # 8 -> 6
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)                    # 6 -> 3
        self.fc1 = nn.Linear(8 * 3 * 3, 32)
        self.relu2 = nn.ReLU()
        self.fc2 = nn.Linear(32, n_classes)

    def forward(self, x):
        x = self.pool(self.relu1(self.conv(x)))
        return self.fc2(self.relu2(self.fc1(torch.flatten(x, 1))))
'''

SIZES = (96, 64, 128)  # train samples per site (test: half)


def _data(n, generator):
    labels = torch.randint(0, 4, (n,), generator=generator)
    inputs = torch.rand(n, 1, 8, 8, generator=generator) * 0.5
    for label in range(4):  # a class is a bright quadrant: learnable in a few steps
        rows, cols = divmod(label, 2)
        inputs[labels == label, :, rows * 4:rows * 4 + 4, cols * 4:cols * 4 + 4] += 0.5
    return inputs, labels


def make_tiny_federation(root, **config):
    """Client dirs and a generic dir under `root`; `config` overrides the generic config.yml."""
    root = Path(root)
    generator = torch.Generator().manual_seed(0)
    clients = []
    for index, n in enumerate(SIZES, start=1):
        client = root / f"client_{index}"
        client.mkdir(parents=True)
        torch.save(_data(n, generator), client / "train_dataset.pth")
        torch.save(_data(n // 2, generator), client / "test_dataset.pth")
        clients.append(client)
    generic = root / "generic"
    generic.mkdir()
    (generic / "model.py").write_text(TINY_MODEL)
    section = {"model": "model.py", "train_dataset": "train_dataset.pth", "test_dataset": "test_dataset.pth",
               "batch_size": 16, "learning_rate": 0.03, "epochs": 1, "max_iter": 2,
               "calibration_batches": 4, "seed": 3, "device": "cpu", **config}
    (generic / "config.yml").write_text(yaml.safe_dump({"fc_quantization": section}))
    return clients, generic
