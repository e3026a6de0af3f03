"""Per-batch augmentation with pure tensor functions (airbench style): no per-sample Python.
All randomness comes from an explicit torch.Generator, so a resumed run draws the same crops."""
from __future__ import annotations

import torch


def batch_flip_lr(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image of (B, C, H, W) left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device) < 0.5
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)


def batch_crop(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random HxW crop of each image zero-padded by `pad` pixels: a random shift in [-pad, pad]."""
    if pad == 0:
        return x
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))             # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=generator.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=generator.device)
    rows = (dy.to(x.device)[:, None] + torch.arange(h, device=x.device))  # (B, H)
    cols = (dx.to(x.device)[:, None] + torch.arange(w, device=x.device))  # (B, W)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)


class Normalize:
    """uint8 (B, C, H, W) -> float32, standardised with the training set's channel statistics."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean = mean.float().view(1, -1, 1, 1)
        self.std = std.float().clamp_min(1e-3).view(1, -1, 1, 1)

    def to(self, device) -> "Normalize":
        return Normalize(self.mean.to(device).flatten(), self.std.to(device).flatten())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255 - self.mean) / self.std
