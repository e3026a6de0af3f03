"""Image files: which names are images, and encoded bytes -> RGB pixels (Pillow). Shared by the
in-memory ImageFolder reader (imagefolder.py) and the on-disk training split (stream.py)."""
from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image

from ..errors import UserError

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".gif", ".tif", ".tiff", ".webp"}


def open_image(blob: bytes, name: str) -> Image.Image:
    """Encoded bytes -> an RGB image; a file Pillow cannot read is a one-line error naming it."""
    try:
        return Image.open(io.BytesIO(blob)).convert("RGB")
    except Exception as e:  # Pillow names the in-memory buffer ('<_io.BytesIO object at 0x...>'): not a path
        why = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e)) or type(e).__name__
        raise UserError(f"cannot decode image {name} ({why}); remove it from the dataset") from None


def decode(blob: bytes, size: int, name: str) -> np.ndarray:
    """Encoded bytes -> (3, H, W) uint8; with `size`, the shorter side resized to it, then the centre crop."""
    img = open_image(blob, name)
    if size:
        # Shorter side to `size`, then centre crop: keeps the aspect ratio of variable-size images.
        w, h = img.size
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)  # (3, H, W)
