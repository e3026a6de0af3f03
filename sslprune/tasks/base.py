"""A task = a head + views + a loss, visible together (lightly / VISSL style).

The backbone maps images to features and is the only thing pruned or transferred. The task owns
everything objective-specific, so a mask found with any task can be re-trained with any other.
"""
from __future__ import annotations

import torch
from torch import nn


class Task(nn.Module):
    """Subclasses define `head` and `views`. Views take normalised float images (B, C, H, W) and
    labels (B,), and return the network inputs and the targets of the loss."""

    name = "base"

    def views(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, targets)

    def step(self, backbone: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """One forward pass. Returns (mean loss, number correct, number of predictions)."""
        inputs, targets = self.views(x, y)
        logits = self.head(backbone(inputs))
        loss = self.loss(logits, targets)
        correct = (logits.argmax(1) == targets).sum()
        return loss, correct, targets.numel()
