"""AlexNet with torchvision's parameter names (features.N, classifier.1/.4); torchvision's last
layer, classifier.6, is the task's head. Input 224x224 (ImageNet scale)."""
from __future__ import annotations

import torch
from torch import nn


class AlexNet(nn.Module):
    torchvision_head = "classifier.6"
    example_size = 224  # smallest traced input is ~63 px; trace at the size it is made for

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(inplace=True))
        self.feature_dim = 4096

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 224, 224) -> (B, 4096)
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def alexnet() -> AlexNet:
    return AlexNet()
