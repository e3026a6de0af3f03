"""Supervised classification: cross-entropy on the dataset's labels, a linear head. With
--label-fraction the lottery trains on the labelled subset only ("10% labels")."""
from __future__ import annotations

import torch
from torch import nn

from .base import Task


class Labels(Task):
    name = "labels"
    metric = "class accuracy"
    options = ("label_fraction", "label_split", "label_seed")
    unlabelled = "drop"       # a fraction of the labels: train on those images only
    stackable = True          # cross-entropy on the batch as it comes
    accumulable = True        # its mean over the images of a micro-batch

    def __init__(self, cfg, feature_dim: int, num_classes: int, num_train: int):
        super().__init__()
        self.head = nn.Linear(feature_dim, num_classes)

    def views(self, batch):
        return batch.images, batch.labels

    @torch.no_grad()
    def evaluate(self, backbone, images, labels, normalize, batch_size, train_labels=None):
        """Loss, accuracy and mean per-class accuracy (the measure for unbalanced test sets such as
        Caltech-101's)."""
        backbone.eval(), self.eval()
        loss_sum, preds = 0.0, []
        for i in range(0, len(images), batch_size):
            logits = self.head(backbone(normalize(images[i:i + batch_size])))
            loss_sum += float(nn.functional.cross_entropy(logits, labels[i:i + batch_size], reduction="sum"))
            preds.append(logits.argmax(1))
        hit = (torch.cat(preds) == labels).float()
        per_class = [hit[labels == c].mean() for c in labels.unique()]
        return {"loss": loss_sum / len(images), "acc": float(hit.mean()),
                "mean_class_acc": float(torch.stack(per_class).mean())}
