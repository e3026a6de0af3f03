"""A small convnet for tests and the demo: three conv-BN-ReLU layers (32, 64, 128 channels; the
last two with stride 2) and global average pooling. Works on any input size from 8x8 up."""
from __future__ import annotations

import torch
from torch import nn


class ConvNet(nn.Module):
    torchvision_head = None

    def __init__(self, widths=(32, 64, 128)):
        super().__init__()
        layers, cin = [], 3
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(cin, w, 3, 1 if i == 0 else 2, 1, bias=False), nn.BatchNorm2d(w),
                       nn.ReLU(inplace=True)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.feature_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 128)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)
