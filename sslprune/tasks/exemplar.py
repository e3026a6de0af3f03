"""Exemplar (Dosovitskiy et al. 2014), as a triplet loss (Doersch & Zisserman 2017): the network
must embed two random transformations of one image closer than views of other images.

Choices (the papers leave them open at this scale), and why:
- views: two per image, each a random crop (side 0.5-1 of the image), a flip, a rotation of up to
  +-20 degrees (Dosovitskiy et al.'s range), colour jitter (brightness, contrast, saturation 0.4,
  hue 0.1, p=0.8) and grayscale (p=0.2), all drawn per image and applied per batch on tensors;
- embedding: a linear head to 128 dimensions (as NPID), L2-normalised, so distances lie in [0, 2]
  and the margin has a fixed meaning whatever the backbone;
- negatives: semi-hard mining in the batch (Schroff et al. 2015, FaceNet): every view is an
  anchor, its positive is the other view of its image, its negative the closest view of another
  image that is still *farther* than the positive (when none is, the farthest negative, as
  TensorFlow's triplet_semihard_loss does: never the hardest one). Mining in
  the batch is free (the 2B x 2B distances are needed anyway). We first used the hardest negative
  (batch-hard): on the demo it collapsed every embedding to one point (loss stuck at the margin,
  retrieval 0.09 after 12 epochs) where semi-hard learned (loss falling, retrieval 0.19);
- margin 0.5, a quarter of the distance range: loss 0 means every positive is 0.5 closer than the
  nearest other image.
The reported accuracy is positive retrieval: the fraction of views whose nearest other view in
the batch is their positive (which depends on the batch size: compare runs at equal batch).
"""
from __future__ import annotations

import torch
from torch import nn

from ..data.augment import colour_jitter, random_affine
from ..errors import UserError
from .base import Batch, Task


def exemplar_view(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) floats in [0, 1] -> one random transformation of each image, same shape."""
    return colour_jitter(random_affine(x, generator), generator)


def triplet_loss(z: torch.Tensor, ids: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Semi-hard triplet loss over unit embeddings z (N, D) with image ids (N,).
    Returns (mean loss over anchors, (N,) True where the anchor's positive beats every negative)."""
    d = (2 - 2 * z @ z.T).clamp_min(1e-12).sqrt()                   # (N, N) distances of unit vectors
    same = ids[:, None] == ids[None, :]
    eye = torch.eye(len(ids), dtype=torch.bool, device=z.device)
    pos = d.masked_fill(~same | eye, -1.0).amax(1)                  # (N,) the (farthest) positive
    far = 4.0                                                       # beyond any distance of unit vectors
    neg = d.masked_fill(same, far)                                  # (N, N) negatives only
    hardest = neg.amin(1)                                           # (N,)
    semi_hard = neg.masked_fill(neg <= pos[:, None], far).amin(1)   # closest negative beyond the positive
    easiest = d.masked_fill(same, -1.0).amax(1)                     # fallback: the farthest negative
    chosen = torch.where(semi_hard < far, semi_hard, easiest)
    loss = (pos - chosen + margin).clamp_min(0).mean()
    return loss, pos < hardest


class Exemplar(Task):
    name = "exemplar"
    metric = "positive retrieval accuracy in the batch"
    batch_metric = True  # evaluate at the training batch size
    options = ("embedding_dim", "margin")

    @classmethod
    def check_data(cls, cfg, train, data) -> None:
        super().check_data(cfg, train, data)
        if min(train.batch_size, len(data.train)) < 2:
            raise UserError("--task exemplar takes its negatives from the other images of the batch: "
                            "--batch-size must be >= 2")

    def __init__(self, cfg, feature_dim: int, num_classes: int, num_train: int):
        super().__init__()
        self.head = nn.Linear(feature_dim, cfg.embedding_dim)
        self.margin = cfg.margin

    def views(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (2B, C, H, W) = [first views; second views]; targets (2B,) = the image of each view."""
        x = batch.images.float() / 255
        ids = torch.arange(len(x), device=x.device)
        return (torch.cat([exemplar_view(x, batch.generator), exemplar_view(x, batch.generator)]),
                torch.cat([ids, ids]))

    @torch.no_grad()
    def evaluate(self, backbone, images, labels, normalize, batch_size, train_labels=None):
        """The metric depends on who shares the batch: test images go in a fixed random order (a
        sorted test set would put one class per batch) and only full batches count."""
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).to(images.device)
        full = max(1, len(images) // batch_size) * batch_size
        return super().evaluate(backbone, images[order[:full]], labels[order[:full]], normalize, batch_size)

    def step(self, backbone, batch, normalize):
        inputs, ids = self.views(batch)        # (2B, ...): the whole batch's views, the same draws on every process
        b, mine = len(batch.images), batch.rows or slice(None)
        if batch.sharded:                      # this process's rows of each view: (2b, C, H, W)
            inputs = torch.cat([inputs[:b][mine], inputs[b:][mine]])
        z = nn.functional.normalize(self.head(backbone(normalize(inputs))), dim=1)  # (2b, D)
        if batch.sharded:  # gathered (N * 2b, D) ordered [rank, view, row] -> [view, rank, row] = the batch's (2B, D)
            z = batch.gather(z).view(-1, 2, len(z) // 2, z.shape[1]).transpose(0, 1).reshape(2 * b, -1)
        loss, hit = triplet_loss(z, ids, self.margin)   # mined over the whole batch, same on every process
        correct = hit.view(2, b)[:, mine]               # this process's anchors
        return loss, correct.sum(), correct.numel()
