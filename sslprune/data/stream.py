"""Training images that do not fit in memory (ImageNet): read from disk every epoch by DataLoader
workers, with `--stream` (an ImageFolder *folder*; a .tar.gz cannot be read at random).

What changes, and what does not:
- the training split is a list of files (`ImageFiles`); the test split is still decoded once and
  kept in memory (bound it with --test-per-class), so evaluations are unchanged;
- the order of the images is the in-memory one: `Task.sampler.epoch_batches` draws it from the run's
  generator, so resuming, S4L's paired batches and NPID's bank rows work as before;
- augmentation is ImageNet's: torchvision's RandomResizedCrop (a crop of 8-100% of the area with
  aspect ratio 3/4-4/3, 10 tries, else the largest central crop within those ratios) resized to
  --image-size with Pillow's bilinear filter, then a left-right flip with p = 1/2 under --flip.
  --crop-pad (CIFAR's padded crop) does not apply;
- each image's draws come from a seed of (run seed, epoch, position in the epoch's order), never
  from a worker's state: a batch is the same whatever the number of workers or processes, and a
  resumed run draws the crops it would have drawn;
- under N processes each process decodes only its rows of every batch and the rows are then
  all-gathered (uint8, B x 3 x S x S bytes per step), so every objective sees the whole batch as
  with in-memory data (sslprune/distributed.py).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from .images import EXTENSIONS, decode, open_image
from .tensors import first_per_class

SCALE = (0.08, 1.0)            # of the image's area (torchvision's RandomResizedCrop defaults)
RATIO = (3 / 4, 4 / 3)         # width / height


@dataclass
class ImageFiles:
    """A split on disk: `files` relative to `root`, one label each, served at `size` x `size`."""
    root: Path
    files: list[str]
    labels: torch.Tensor   # (N,) int64
    size: int

    def __post_init__(self):
        if self.labels.shape != (len(self.files),):
            raise ValueError("one label per file expected")

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.size, self.size)

    def take(self, rows: torch.Tensor) -> "ImageFiles":
        return ImageFiles(self.root, [self.files[i] for i in rows.tolist()], self.labels[rows], self.size)

    def relabel(self, labels: torch.Tensor) -> "ImageFiles":
        return ImageFiles(self.root, self.files, labels, self.size)

    def first_per_class(self, n: int) -> "ImageFiles":
        return first_per_class(self, n)

    def centre_crops(self, rows: list[int]) -> torch.Tensor:
        """(len(rows), 3, S, S) uint8: the shorter side resized to S, then the centre (no randomness)."""
        return torch.stack([torch.from_numpy(decode((self.root / self.files[i]).read_bytes(), self.size,
                                                    str(self.root / self.files[i])).copy()) for i in rows])

    def channel_stats(self, n: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std (0-1 scale) of the centre crops of n images spread evenly over
        the split (deterministic): each (3,)."""
        rows = np.linspace(0, len(self) - 1, min(n, len(self))).round().astype(int).tolist()
        x = self.centre_crops(rows).to(torch.float64).div_(255)
        return x.mean((0, 2, 3)).float(), x.std((0, 2, 3)).float()

    def digest(self, h) -> None:
        """Feed the split's identity into hashlib object h: every relative path, byte size and
        label (reading 100+ GB to hash the pixels is not an option)."""
        for name, label in zip(self.files, self.labels.tolist()):
            h.update(f"{name}|{(self.root / name).stat().st_size}|{label}\n".encode())


def resized_crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (left, top, w, h) of the crop."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    ratio = width / height  # fallback: the largest central crop whose aspect lies in RATIO
    if ratio < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif ratio > RATIO[1]:
        w, h = round(height * RATIO[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class Crops(torch.utils.data.Dataset):
    """Item (row, epoch, position) -> (3, S, S) uint8: a random-resized crop of file `row`, flipped
    with p = 1/2 when `flip`, drawn from the seed (seed, epoch, position)."""

    def __init__(self, files: ImageFiles, flip: bool, seed: int):
        self.files, self.flip, self.seed = files, flip, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int, int]) -> torch.Tensor:
        row, epoch, position = key
        rng = np.random.default_rng([self.seed, epoch, position])
        path = self.files.root / self.files.files[row]
        img = open_image(path.read_bytes(), str(path))
        left, top, w, h = resized_crop_box(*img.size, rng)
        s = self.files.size
        img = img.resize((s, s), Image.BILINEAR, box=(left, top, left + w, top + h))
        if self.flip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy())


class _EpochBatches:
    """The DataLoader's batch sampler: this epoch's batches of keys, replaced every epoch (it runs
    in the main process, so persistent workers need not restart)."""

    def __init__(self):
        self.batches: list[list[tuple[int, int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def default_workers() -> int:
    """Decoding processes per training process: the CPUs this process may use, shared with the
    other local training processes, at most 8 (more rarely helps one GPU)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1))


class Stream:
    """Decodes each epoch's batches in `workers` processes (0: in this process), ahead of training."""

    def __init__(self, files: ImageFiles, flip: bool, seed: int, workers: int, pin_memory: bool):
        self.sampler = _EpochBatches()
        self.loader = torch.utils.data.DataLoader(
            Crops(files, flip, seed), batch_sampler=self.sampler, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=pin_memory, prefetch_factor=4 if workers else None)

    def epoch(self, order: torch.Tensor, epoch: int, rows: slice | None):
        """Yields this process's rows of each batch of `order` (steps, B): (b, 3, S, S) uint8."""
        b = order.shape[1]
        mine = range(b)[rows or slice(None)]
        keys = order.tolist()
        self.sampler.batches = [[(keys[i][j], epoch, i * b + j) for j in mine] for i in range(len(keys))]
        try:
            yield from self.loader
        except UserError as e:  # raised in a worker: its message's last line is ours, without the trace
            raise UserError(str(e).strip().splitlines()[-1].removeprefix("sslprune.errors.UserError: ")) from None


def scan(root: Path, split: str, classes: list[str], limit: int, size: int) -> ImageFiles:
    """`root/split/<class>/*` as ImageFiles: classes in the given order, files sorted by name, at
    most `limit` per class (0 = all)."""
    files, labels = [], []
    for label, c in enumerate(classes):
        folder = root / split / c
        names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS) if folder.is_dir() else []
        if not names:
            raise UserError(f"class folder {split}/{c} of {root} holds no images; remove it or add images")
        names = names[:limit or None]
        files += [f"{split}/{c}/{n}" for n in names]
        labels += [label] * len(names)
    return ImageFiles(root, files, torch.tensor(labels), size)
