"""RotNet (Gidaris et al. 2018): predict which of 0/90/180/270 degrees an image was rotated by.

Every image of the batch is shown in all four rotations, made with exact `torch.rot90` (never an
interpolated rotation by a sampled angle, the open_lth bug). Rotation k is k*90 degrees
counter-clockwise. The dataset's labels are never read.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Task


def rotate4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) -> inputs (4B, C, H, W) ordered [all k=0, all k=1, all k=2, all k=3], targets (4B,)."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotation needs square images, got {tuple(x.shape[-2:])}")
    inputs = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
    targets = torch.arange(4, device=x.device).repeat_interleave(x.shape[0])
    return inputs, targets


class Rotation(Task):
    name = "rotation"
    metric = "rotation accuracy"
    square = True
    accumulable = True   # the 4 rotations of each image of a micro-batch, one mean

    def __init__(self, cfg, feature_dim: int, num_classes: int, num_train: int):
        super().__init__()
        self.head = nn.Linear(feature_dim, 4)  # 4-way, whatever the dataset's classes

    def views(self, batch):
        return rotate4(batch.images)
