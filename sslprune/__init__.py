"""sslprune: lottery-ticket pruning of networks trained with self-supervision (Caron et al. 2020).

The Python API (sslprune/api.py; README "Python API"), for any nn.Module:

    mask = sslprune.prune_global(model, 0.2)             # {weight name: bool tensor}, global magnitude
    sslprune.apply_mask(model, mask)                     # zero the pruned weights
    with sslprune.enforce_mask(model, mask, optimizer):  # ... and keep them zero in your own loop
        ...
    metrics = sslprune.fit(model, images, labels, objective="rotation", mask=mask, epochs=1)
    sslprune.to_torch_prune(model, mask); mask = sslprune.from_torch_prune(model)

The API names are loaded on first use (PEP 562), so `import sslprune` and the `sslprune` command
do not pay for torch until they need it; the submodules (sslprune.cli, sslprune.pruning, ...)
import as before.
"""
from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING

try:
    __version__ = metadata.version("sslprune")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__", "Mask", "MaskEnforcer", "UserError", "apply_mask", "dense_mask", "density",
           "enforce_mask", "fit", "from_torch_prune", "infer_feature_dim", "prune_global", "to_torch_prune"]
_API = frozenset(__all__[1:])  # loaded from sslprune.api on first use

if TYPE_CHECKING:  # what editors and type checkers see
    from .api import (Mask, MaskEnforcer, UserError, apply_mask, dense_mask, density, enforce_mask, fit,
                      from_torch_prune, infer_feature_dim, prune_global, to_torch_prune)


def __getattr__(name: str):
    if name in _API:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'sslprune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
