"""A dataset split held in memory as a uint8 tensor: what every reader returns (with --stream, an
ImageFolder's training split is an ImageFiles instead: sslprune/data/stream.py)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

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

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def take(self, rows: torch.Tensor) -> "Split":
        return Split(self.images[rows], self.labels[rows])

    def relabel(self, labels: torch.Tensor) -> "Split":
        return Split(self.images, labels)

    def first_per_class(self, n: int) -> "Split":
        return first_per_class(self, n)


def first_per_class(split, n: int):
    """The first n images of each class of a Split or ImageFiles, in dataset order (0 = all)."""
    if n <= 0:
        return split
    keep = torch.zeros(len(split), dtype=torch.bool)
    for c in split.labels.unique():
        keep[(split.labels == c).nonzero().flatten()[:n]] = True
    return split.take(keep.nonzero().flatten())



@dataclass
class Dataset:
    name: str
    train: Split          # or stream.ImageFiles (--stream): the same interface, on disk
    test: Split
    classes: list[str]
    _stats: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std of the training images on the 0-1 scale, each (3,).
        Computed once, in chunks (a float copy of CIFAR-10 would take 600 MB)."""
        if self._stats is None and not isinstance(self.train, Split):  # on disk: a sample
            self._stats = self.train.channel_stats()
        if self._stats is None:
            total = torch.zeros(3, dtype=torch.float64)
            squares = torch.zeros(3, dtype=torch.float64)
            for i in range(0, len(self.train), 4096):
                x = self.train.images[i:i + 4096].to(torch.float64).div_(255)
                total += x.sum(dim=(0, 2, 3))
                squares += x.square().sum(dim=(0, 2, 3))
            n = self.train.images[:, 0].numel()
            mean = total / n
            std = ((squares - n * mean.square()) / (n - 1)).clamp_min(0).sqrt()
            self._stats = (mean.float(), std.float())
        return self._stats

    def fingerprint(self) -> str:
        """sha256 of every image and label: identifies the data a run was trained on, wherever
        it lives on disk."""
        h = hashlib.sha256()
        for split in (self.train, self.test):
            if not isinstance(split, Split):  # on disk: paths, sizes and labels
                split.digest(h)
                continue
            h.update(split.images.contiguous().numpy().tobytes())
            h.update(split.labels.to(torch.int64).contiguous().numpy().tobytes())
        h.update("\n".join(self.classes).encode())
        return h.hexdigest()[:16]
