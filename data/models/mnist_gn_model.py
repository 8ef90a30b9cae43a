"""The sample's LeNet with GroupNorm after each convolution, for 1x28x28 images: normalization
without running statistics, which the benchmarks compare with BatchNorm under label skew
(README, "With BatchNorm"). GroupNorm has no int8 kernel: the int8 model keeps it in float."""
import torch
from torch import nn


class Model(nn.Module):
    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, kernel_size=3)      # 28 -> 26
        self.norm1 = nn.GroupNorm(3, 6)                  # groups of 2 channels
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)                     # 26 -> 13
        self.conv2 = nn.Conv2d(6, 16, kernel_size=3)     # 13 -> 11
        self.norm2 = nn.GroupNorm(4, 16)                 # groups of 4 channels
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)                     # 11 -> 5
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.norm1(self.conv1(x))))
        x = self.pool2(self.relu2(self.norm2(self.conv2(x))))
        x = torch.flatten(x, 1)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)
