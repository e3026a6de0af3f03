"""Supervised classification: cross-entropy on the dataset's labels, a linear head. With
--label-fraction the lottery trains on the labelled subset only ("10% labels")."""
from __future__ import annotations

from torch import nn

from .base import Task


class Labels(Task):
    name = "labels"
    metric = "class accuracy"

    def __init__(self, cfg, feature_dim: int, num_classes: int, num_train: int):
        super().__init__()
        self.head = nn.Linear(feature_dim, num_classes)

    def views(self, batch):
        return batch.images, batch.labels
