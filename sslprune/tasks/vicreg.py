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

With --budget t (Krishna et al. 2023, "VICReg-Dual"): the backbone is a gated ResNet
(models/gated.py); the first view goes through the gated path, the second through the dense path,
one projector, no stop-gradient. Two losses hold the gated path to t of the dense MACs (DGNet's, as
their code): L_spar = 5 (mean_i F_gated(i) / F_dense - t)^2, F counted per image from its open
channels (gate networks included), and L_bound = mean over blocks of relu(p sqrt(t) - rho_l)^2 +
relu(rho_l - 1 + p - p sqrt(t))^2, rho_l the batch's open fraction of block l: every block starts
near sqrt(t) open, and the band relaxes to [0, 1] as training goes on. Their p = exp(-0.02 epoch)
over 500 epochs is written here as p = exp(-10 e / E) for epoch e of E, the same at E = 500: a
30-epoch run would otherwise end with its blocks held at >= 0.55 sqrt(t) open (measured: realised
MACs 0.30 at epoch 12 of 30 for t = 0.1, each block held at >= 0.25), never reaching a small budget.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..data.augment import colour_jitter, random_affine
from ..errors import UserError
from ..models.gated import gate_statistics
from .base import Batch, Task

WEIGHTS = (25.0, 25.0, 1.0)   # invariance, variance, covariance
SPARSITY_WEIGHT, BOUND_WEIGHT, BOUND_DECAY = 5.0, 1.0, 10.0   # lambda, gamma, alpha * 500 epochs of the budget losses


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


def budget_losses(ratio: torch.Tensor, opened: torch.Tensor, budget: float, progress: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ratio: (B,) each image's gated MACs / dense MACs; opened: (B, L) its open fraction per block;
    progress: epochs done / epochs, in [0, 1). Returns (L_spar, L_bound)."""
    spar = SPARSITY_WEIGHT * (ratio.mean() - budget) ** 2
    p, root = math.exp(-BOUND_DECAY * progress), math.sqrt(budget)
    rho = opened.mean(0)                                                  # (L,) the batch's open fraction per block
    bound = BOUND_WEIGHT * (torch.relu(p * root - rho) ** 2 + torch.relu(rho - 1 + p - p * root) ** 2).mean()
    return spar, bound


@torch.no_grad()
def retrieved(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """The monitor: (B,) bool, whether each first view's nearest second view (cosine) is its own image's."""
    sim = nn.functional.normalize(z1, dim=1) @ nn.functional.normalize(z2, dim=1).T
    return sim.argmax(1) == torch.arange(len(z1), device=z1.device)


def projector(feature_dim: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(feature_dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                         nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))


class VICReg(Task):
    name = "vicreg"
    metric = "positive retrieval accuracy in the batch"
    batch_metric = True
    options = ("projector_dim", "budget")

    @classmethod
    def check_config(cls, cfg) -> None:
        if not 0 <= cfg.budget <= 1:
            raise UserError(f"--budget is a fraction of the dense network's MACs, in (0, 1] (0 = no gated path), "
                            f"got {cfg.budget}")

    @classmethod
    def check_data(cls, cfg, train, data) -> None:
        super().check_data(cfg, train, data)
        if min(train.batch_size, len(data.train)) < 2:
            raise UserError("--task vicreg measures variance and covariance over the batch: --batch-size must be >= 2")
        h, w = data.train.image_shape[-2:]
        if cfg.budget and h != w:   # MACs are counted for square inputs (models/gated.py: costs)
            raise UserError(f"--budget counts MACs on square images, these are {h}x{w}; pass --image-size N")

    def __init__(self, cfg, feature_dim: int, num_classes: int, num_train: int):
        super().__init__()
        self.head = projector(feature_dim, cfg.projector_dim)
        self.budget = cfg.budget
        self.progress = 0.0   # the last training step's (epochs done / epochs): evaluate() measures L_bound at it

    def identity(self) -> str:
        return f"{self.name}, budget {self.budget}" if self.budget else self.name

    @torch.no_grad()
    def evaluate(self, backbone, images, labels, normalize, batch_size, train_labels=None):
        """Test images in a fixed random order (a sorted set would put one class per batch), full batches only."""
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).to(images.device)
        full = min(len(images), max(1, len(images) // batch_size) * batch_size)
        if not self.budget:
            return super().evaluate(backbone, images[order[:full]], labels[order[:full]], normalize, batch_size)
        backbone.eval(), self.eval()
        generator = torch.Generator(device=images.device).manual_seed(0)
        sums: dict[str, float] = {}
        for i in range(0, full, batch_size):   # the loss terms and the monitor: the views, as in training
            idx = order[i:min(i + batch_size, full)]
            loss, hits, n, stats = self._dual(backbone, Batch(images[idx], labels[idx], idx, generator), normalize)
            for k, v in {"loss": loss, "acc": hits / n, **stats}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(idx) / full
        return sums | gate_statistics(backbone, images, normalize, batch_size)

    def step(self, backbone, batch: Batch, normalize):
        if self.budget:
            return self._dual(backbone, batch, normalize)[:3]
        x = batch.images.float() / 255
        views = [vicreg_view(x, batch.generator), vicreg_view(x, batch.generator)]   # the same draws on every process
        mine = batch.rows or slice(None)
        # each view alone through backbone and projector (batch-norm per view); this process's rows,
        # gathered to the whole batch's (B, D) with gradients flowing back to where they came from
        z1, z2 = (batch.gather(self.head(backbone(normalize(v[mine])))) for v in views)
        loss, _ = vicreg_loss(z1, z2)
        hit = retrieved(z1, z2)[mine]
        return loss, hit.sum(), hit.numel()

    def _dual(self, backbone, batch: Batch, normalize):
        """VICReg between the gated path (first view) and the dense path (second view), plus the
        budget losses. Returns (loss, hits, n, stats): stats are the batch's loss terms (invariance,
        variance, covariance, spar, bound; tensors without grad)."""
        x = batch.images.float() / 255
        views = [vicreg_view(x, batch.generator), vicreg_view(x, batch.generator)]
        g = batch.generator   # the gates' noise: drawn for the whole batch, the same on every process
        uniform = torch.rand(len(x), backbone.gate_channels, generator=g, device=g.device).to(x.device)
        mine = batch.rows or slice(None)
        training = backbone.training
        f1 = backbone(normalize(views[0][mine]), path="gated", uniform=uniform[mine] if training else None)
        gates = backbone.gates                                                # per block (b, C_l)
        z1 = batch.gather(self.head(f1))
        z2 = batch.gather(self.head(backbone(normalize(views[1][mine]))))
        vic, terms = vicreg_loss(z1, z2)
        side = x.shape[-1]
        ratio = backbone.macs(gates, side) / backbone.dense_macs(side)        # (b,)
        per_image = batch.gather(torch.stack([ratio, *[g.mean(1) for g in gates]], 1))   # (B, 1 + L)
        if training:
            self.progress = batch.progress
        spar, bound = budget_losses(per_image[:, 0], per_image[:, 1:], self.budget, self.progress)
        hit = retrieved(z1, z2)[mine]
        with torch.no_grad():
            stats = {k: v.detach() if torch.is_tensor(v) else torch.tensor(v)
                     for k, v in {**terms, "spar": spar, "bound": bound}.items()}
        return vic + spar + bound, hit.sum(), hit.numel(), stats
