"""scikit-learn's handwritten digits (1,797 images, 8x8, 10 classes): shipped inside a dependency,
so the demo needs no download. Grey levels 0-16 are scaled to 0-255 and repeated to 3 channels.
Split: every fifth image (by index) is a test image, a fixed rule."""
from __future__ import annotations

import torch

from ..errors import UserError
from .tensors import Dataset, Split


def load_digits(root=None, **_) -> Dataset:
    from sklearn.datasets import load_digits as sk_load

    if root:  # recorded with the run, it would claim data that was never read
        raise UserError(f"--dataset digits is embedded in scikit-learn and reads no --data-root ({root}); drop it")

    d = sk_load()
    x = torch.from_numpy(d.images).float().mul(255 / 16).round().to(torch.uint8)  # (N, 8, 8)
    x = x[:, None].expand(-1, 3, -1, -1).contiguous()                            # (N, 3, 8, 8)
    y = torch.from_numpy(d.target).long()
    test = torch.arange(len(y)) % 5 == 0
    return Dataset("digits", Split(x[~test], y[~test]), Split(x[test], y[test]),
                   [str(i) for i in range(10)])
