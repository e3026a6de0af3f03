"""VICReg (Bardes, Ponce & LeCun 2022): two views of each image, a projector, and a loss with three
terms on the two batches of embeddings: invariance (their mean squared difference), variance (a
hinge keeping every dimension's standard deviation above 1 in each view, against collapse) and
covariance (the squared off-diagonal covariances of each view, decorrelating the dimensions).

As the official implementation and Krishna et al. 2023 (its CIFAR scripts, through solo-learn):
- loss weights 25 (invariance), 25 (variance), 1 (covariance); variance on sqrt(var + 1e-4);
- projector: Linear-BN-ReLU, Linear-BN-ReLU, Linear, all of --projector-dim (2048 in the papers);
- each view goes through the backbone and projector on its own (batch-norm statistics per view);
- views: a random crop of 0.2-1 of the image's area, resized back (square: our affine crop), a flip,
  colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2, solarisation p 0.1; no blur (as
  their CIFAR scripts).
The reported accuracy is a monitor, positive retrieval: the fraction of first views whose nearest
second view in the batch (cosine) is their own image's (it depends on the batch size).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..data.augment import colour_jitter, random_affine
from ..errors import UserError
from .base import Batch, Task

WEIGHTS = (25.0, 25.0, 1.0)   # invariance, variance, covariance


def solarise(x: torch.Tensor, generator: torch.Generator, p: float = 0.1) -> torch.Tensor:
    """(B, C, H, W) floats in [0, 1]: with probability p per image, every value >= 0.5 becomes 1 - it."""
    on = (torch.rand(len(x), generator=generator, device=generator.device) < p).to(x.device).view(-1, 1, 1, 1)
    return torch.where(on & (x >= 0.5), 1 - x, x)


def vicreg_view(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) floats in [0, 1] -> one random view of each image, same shape."""
    side = (math.sqrt(0.2), 1.0)   # a square crop of 0.2-1 of the area
    x = random_affine(x, generator, scale=side, max_degrees=0.0)
    return solarise(colour_jitter(x, generator, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1), generator)


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VICReg's loss of two (B, D) embedding batches; returns it and its three terms."""
    b, d = z1.shape
    invariance = nn.functional.mse_loss(z1, z2)
    variance, covariance = 0.0, 0.0
    for z in (z1, z2):
        z = z - z.mean(0)
        std = torch.sqrt(z.var(0) + 1e-4)
        variance = variance + torch.relu(1 - std).mean() / 2
        cov = z.T @ z / (b - 1)                                          # (D, D)
        covariance = covariance + (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / d
    terms = {"invariance": invariance, "variance": variance, "covariance": covariance}
    return sum(w * t for w, t in zip(WEIGHTS, terms.values())), terms


def projector(feature_dim: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(feature_dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                         nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))


class VICReg(Task):
    name = "vicreg"
    metric = "positive retrieval accuracy in the batch"
    batch_metric = True
    options = ("projector_dim",)

    @classmethod
    def check_data(cls, cfg, train, data) -> None:
        super().check_data(cfg, train, data)
        if min(train.batch_size, len(data.train)) < 2:
            raise UserError("--task vicreg measures variance and covariance over the batch: --batch-size must be >= 2")

    def __init__(self, cfg, feature_dim: int, num_classes: int, num_train: int):
        super().__init__()
        self.head = projector(feature_dim, cfg.projector_dim)

    @torch.no_grad()
    def evaluate(self, backbone, images, labels, normalize, batch_size, train_labels=None):
        """Test images in a fixed random order (a sorted set would put one class per batch), full batches only."""
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).to(images.device)
        full = max(1, len(images) // batch_size) * batch_size
        return super().evaluate(backbone, images[order[:full]], labels[order[:full]], normalize, batch_size)

    def step(self, backbone, batch: Batch, normalize):
        x = batch.images.float() / 255
        views = [vicreg_view(x, batch.generator), vicreg_view(x, batch.generator)]   # the same draws on every process
        mine = batch.rows or slice(None)
        # each view alone through backbone and projector (batch-norm per view); this process's rows,
        # gathered to the whole batch's (B, D) with gradients flowing back to where they came from
        z1, z2 = (batch.gather(self.head(backbone(normalize(v[mine])))) for v in views)
        loss, _ = vicreg_loss(z1, z2)
        with torch.no_grad():  # monitor: is each first view's nearest second view its own image's?
            sim = nn.functional.normalize(z1, dim=1) @ nn.functional.normalize(z2, dim=1).T
            hit = (sim.argmax(1) == torch.arange(len(z1), device=z1.device))[mine]
        return loss, hit.sum(), hit.numel()
