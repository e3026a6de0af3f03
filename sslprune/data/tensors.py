"""A dataset split held in memory as a uint8 tensor: what every reader returns."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Split:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) uint8, got {tuple(self.images.shape)} "
                             f"{self.images.dtype}")
        if self.labels.shape != (len(self.images),):
            raise ValueError("one label per image expected")

    def __len__(self) -> int:
        return len(self.images)

    def first_per_class(self, n: int) -> "Split":
        """The first n images of each class, in dataset order (0 = all). Deterministic."""
        if n <= 0:
            return self
        keep = torch.zeros(len(self), dtype=torch.bool)
        for c in self.labels.unique():
            keep[(self.labels == c).nonzero().flatten()[:n]] = True
        return Split(self.images[keep], self.labels[keep])

    def to(self, device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std of the training images on the 0-1 scale, each (3,)."""
        x = self.train.images.float().div_(255)
        return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
