"""Which training images each step sees: one (steps, batch) index tensor per epoch. A task names its
sampler (Task.sampler); the training loop asks it.

- UNIFORM: a random permutation cut into full batches (the last partial batch is dropped:
  batch-norm needs full batches);
- PAIRED (S4L): every batch is B//2 labelled then B//2 unlabelled images (an odd B loses one). An
  epoch is one pass over the unlabelled images; the (smaller) labelled set is cycled, reshuffled on
  every pass.
"""
from __future__ import annotations

import torch

UNLABELLED = -1  # the label of an image whose label the objective may not see


def _perm(n: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randperm(n, generator=generator, device=generator.device).to(device)


class Uniform:
    def width(self, batch_size: int) -> int:
        """The batch a --batch-size asks for (before the data bounds it)."""
        return batch_size

    def steps_per_epoch(self, labels: torch.Tensor, batch_size: int) -> int:
        return max(1, len(labels) // min(batch_size, len(labels)))

    def batch_width(self, labels: torch.Tensor, batch_size: int) -> int:
        """The number of images epoch_batches puts in each batch."""
        return min(batch_size, len(labels))

    def epoch_batches(self, labels: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Indices (steps, B) into the training split, drawn from `generator`; labels (N,) on the
        training device, UNLABELLED where hidden."""
        steps, b = self.steps_per_epoch(labels, batch_size), self.batch_width(labels, batch_size)
        return _perm(len(labels), generator, labels.device)[:steps * b].view(steps, b)


class Paired(Uniform):
    def width(self, batch_size: int) -> int:
        return batch_size // 2 * 2                      # half labelled, half unlabelled: an even batch

    def _half(self, labels: torch.Tensor, batch_size: int) -> int:
        return min(max(1, batch_size // 2), int((labels == UNLABELLED).sum()))

    def steps_per_epoch(self, labels: torch.Tensor, batch_size: int) -> int:
        return max(1, int((labels == UNLABELLED).sum()) // self._half(labels, batch_size))

    def batch_width(self, labels: torch.Tensor, batch_size: int) -> int:
        return 2 * self._half(labels, batch_size)

    def epoch_batches(self, labels: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        steps, half = self.steps_per_epoch(labels, batch_size), self._half(labels, batch_size)
        unlabelled = (labels == UNLABELLED).nonzero().flatten()
        labelled = (labels != UNLABELLED).nonzero().flatten()
        u = unlabelled[_perm(len(unlabelled), generator, labels.device)[:steps * half]].view(steps, half)
        passes = -(-steps * half // len(labelled))                      # ceil: enough labelled draws
        lab = torch.cat([labelled[_perm(len(labelled), generator, labels.device)] for _ in range(passes)])
        return torch.cat([lab[:steps * half].view(steps, half), u], 1)  # (steps, 2 * half)


UNIFORM, PAIRED = Uniform(), Paired()
