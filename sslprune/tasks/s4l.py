"""S4L-Rotation (Zhai et al. 2019): label cross-entropy on the labelled images plus the RotNet loss
on all images.

Each step sees B/2 labelled and B/2 unlabelled images (the "paired" sampler). All B are shown in
the four exact rotations (4B inputs) for the rotation head; the label head reads the features of
the unrotated labelled images. Unlabelled images arrive with label UNLABELLED (-1): their labels
are removed when the dataset is prepared (`labelled.task_data`), before any task code runs.
loss = CE(labels) + rotation_weight * CE(rotations).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import distributed
from ..errors import UserError
from .base import UNLABELLED, Batch, Task
from .rotation import rotate4
from .sampling import PAIRED


class S4LRotation(Task):
    name = "s4l"
    metric = "class accuracy"
    sampler = PAIRED
    options = ("label_fraction", "label_split", "label_seed", "rotation_weight")
    unlabelled = "keep"       # RotNet on every image, labels on the labelled part
    square = True
    demo_options = {"label_fraction": 0.1}   # the paper's setting

    @classmethod
    def check_config(cls, cfg) -> None:
        if not 0.0 < cfg.label_fraction < 1.0:
            raise UserError(f"--task s4l needs a labelled and an unlabelled part: set --label-fraction "
                            f"in (0, 1), e.g. 0.1 (got {cfg.label_fraction})")

    @classmethod
    def check_data(cls, cfg, train, data) -> None:
        super().check_data(cfg, train, data)
        if train.batch_size < 2:
            raise UserError("--task s4l splits each batch into labelled and unlabelled halves: --batch-size must be >= 2")

    def __init__(self, cfg, feature_dim: int, num_classes: int, num_train: int):
        super().__init__()
        self.head = nn.Linear(feature_dim, num_classes)  # labels
        self.rotation_head = nn.Linear(feature_dim, 4)
        self.rotation_weight = cfg.rotation_weight

    def forward_both(self, backbone, batch: Batch, normalize):
        """Returns label logits of the labelled images (L, C), their labels (L,), rotation logits
        (4B, 4) and rotation targets (4B,)."""
        inputs, rot_targets = rotate4(batch.images)                       # [k=0 block, k=1, k=2, k=3]
        features = backbone(normalize(inputs))                            # (4B, F)
        labelled = batch.labels != UNLABELLED                              # (B,)
        label_logits = self.head(features[:len(batch.labels)][labelled])   # k=0 block: unrotated
        return label_logits, batch.labels[labelled], self.rotation_head(features), rot_targets

    def step(self, backbone, batch, normalize):
        label_logits, labels, rot_logits, rot_targets = self.forward_both(backbone, batch.local(), normalize)
        loss = self.rotation_weight * nn.functional.cross_entropy(rot_logits, rot_targets)  # equal shares
        labelled = int((batch.labels != UNLABELLED).sum())   # in the whole batch, wherever they landed
        if labelled:  # the mean over the batch's labelled images: N/labelled per process averages to it.
            # A process with none of them still adds the (zero) term, so every rank has a head gradient.
            share = distributed.world() if batch.sharded else 1
            loss = loss + nn.functional.cross_entropy(label_logits, labels, reduction="sum") * (share / labelled)
        return loss, (label_logits.argmax(1) == labels).sum(), len(labels)

    @torch.no_grad()
    def evaluate(self, backbone, images, labels, normalize, batch_size, train_labels=None):
        """Loss, class accuracy (acc) and rotation accuracy on the test split, all of it labelled."""
        backbone.eval(), self.eval()
        generator = torch.Generator(device=images.device)  # unused: S4L's views are not random
        loss_sum, correct, rot_correct = 0.0, 0, 0
        for i in range(0, len(images), batch_size):
            idx = torch.arange(i, min(i + batch_size, len(images)), device=images.device)
            label_logits, y, rot_logits, rot_targets = self.forward_both(
                backbone, Batch(images[idx], labels[idx], idx, generator), normalize)
            loss = (nn.functional.cross_entropy(label_logits, y)
                    + self.rotation_weight * nn.functional.cross_entropy(rot_logits, rot_targets))
            loss_sum += float(loss) * len(idx)
            correct += int((label_logits.argmax(1) == y).sum())
            rot_correct += int((rot_logits.argmax(1) == rot_targets).sum())
        return {"loss": loss_sum / len(images), "acc": correct / len(images),
                "rotation_acc": rot_correct / (4 * len(images))}
