"""The CIFAR-10 net of PyTorch's classic tutorial, for 3x32x32 images: two 5x5 convolutions,
three linear layers. Use it with `model: cifar_model.py` and CIFAR-shaped datasets."""
import torch
from torch import nn


class Model(nn.Module):
    def __init__(self, n_classes: int = 10):
        super().__init__()
        # each ReLU is its own module so conv/linear + relu pairs can be fused for int8
        self.conv1 = nn.Conv2d(3, 6, kernel_size=5)      # 32 -> 28
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)                     # 28 -> 14
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)     # 14 -> 10
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)                     # 10 -> 5
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)
