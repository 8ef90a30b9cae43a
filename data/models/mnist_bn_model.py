"""The sample's LeNet with BatchNorm after each convolution, for 1x28x28 images: the model the
benchmarks use to check the batch-size advice on a network with BatchNorm (README, "With BatchNorm").
Use it with `model: mnist_bn_model.py` where `mnist_model.py` fits."""
import torch
from torch import nn


class Model(nn.Module):
    def __init__(self, n_classes: int = 10):
        super().__init__()
        # conv + bn + relu as separate modules, so each triple fuses into one int8 convolution
        self.conv1 = nn.Conv2d(1, 6, kernel_size=3)      # 28 -> 26
        self.bn1 = nn.BatchNorm2d(6)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)                     # 26 -> 13
        self.conv2 = nn.Conv2d(6, 16, kernel_size=3)     # 13 -> 11
        self.bn2 = nn.BatchNorm2d(16)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)                     # 11 -> 5
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        x = torch.flatten(x, 1)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)
