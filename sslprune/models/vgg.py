"""VGG-19 with batch-norm for CIFAR, as in Morcos et al. 2019 / open_lth: the MLP replaced by one
linear layer (which here is the task's head). Convs have no bias: batch-norm follows each."""
from __future__ import annotations

import torch
from torch import nn

CFG_19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512]


class VGG(nn.Module):
    torchvision_head = None

    def __init__(self, cfg):
        super().__init__()
        layers, cin = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.feature_dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32) -> (B, 512)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)


def vgg19() -> VGG:
    return VGG(CFG_19)
