"""Which training images each step sees: one (steps, batch) index tensor per epoch.

- uniform: a random permutation cut into full batches (the last partial batch is dropped:
  batch-norm needs full batches);
- paired (S4L): every batch is B//2 labelled then B//2 unlabelled images (an odd B loses one). An epoch is one pass over
  the unlabelled images; the (smaller) labelled set is cycled, reshuffled on every pass.
"""
from __future__ import annotations

import torch

from .tasks import UNLABELLED


def steps_per_epoch(sampler: str, labels: torch.Tensor, batch_size: int) -> int:
    if sampler == "paired":
        n = int((labels == UNLABELLED).sum())
        return max(1, n // min(max(1, batch_size // 2), n))
    return max(1, len(labels) // min(batch_size, len(labels)))


def batch_width(sampler: str, labels: torch.Tensor, batch_size: int) -> int:
    """The number of images epoch_batches puts in each batch (B, or fewer: see above)."""
    if sampler == "paired":
        return 2 * min(max(1, batch_size // 2), int((labels == UNLABELLED).sum()))
    return min(batch_size, len(labels))


def epoch_batches(sampler: str, labels: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Indices (steps, B) into the training split, drawn from `generator`; labels (N,) on the
    training device, UNLABELLED where hidden."""
    steps = steps_per_epoch(sampler, labels, batch_size)

    def perm(n):
        return torch.randperm(n, generator=generator, device=generator.device).to(labels.device)

    if sampler != "paired":
        b = min(batch_size, len(labels))
        return perm(len(labels))[:steps * b].view(steps, b)
    unlabelled = (labels == UNLABELLED).nonzero().flatten()
    labelled = (labels != UNLABELLED).nonzero().flatten()
    half = min(max(1, batch_size // 2), len(unlabelled))
    u = unlabelled[perm(len(unlabelled))[:steps * half]].view(steps, half)
    passes = -(-steps * half // len(labelled))                      # ceil: enough labelled draws
    lab = torch.cat([labelled[perm(len(labelled))] for _ in range(passes)])[:steps * half].view(steps, half)
    return torch.cat([lab, u], 1)                                   # (steps, 2 * half)
