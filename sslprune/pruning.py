"""Masks and global unstructured pruning (Han et al. 2015; setup of Frankle et al. / Morcos et al.).

A mask is a plain dict {parameter name: bool tensor} over the backbone's prunable weights: the
weights of its Conv2d and Linear layers. Biases, batch-norm parameters and every head (heads live
in tasks, not in the backbone) are never pruned.

Criterion apart from selection: `SCORES[name](weights, generator)` scores each weight; `prune`
removes the lowest-scoring `fraction` of the weights that survive the current mask, ranked
globally across layers (or each layer alone: scope "layer"), so masks are nested by construction.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

Mask = dict[str, torch.Tensor]


def prunable(backbone: nn.Module) -> dict[str, nn.Parameter]:
    """{name: weight} of every Conv2d / Linear weight, in module order."""
    return {f"{mod_name}.weight" if mod_name else "weight": m.weight
            for mod_name, m in backbone.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def dense_mask(backbone: nn.Module) -> Mask:
    return {n: torch.ones_like(w, dtype=torch.bool, device="cpu") for n, w in prunable(backbone).items()}


def magnitude_scores(weights: dict[str, torch.Tensor], generator=None) -> dict[str, torch.Tensor]:
    return {n: w.detach().abs().float().cpu() for n, w in weights.items()}


def random_scores(weights: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {n: torch.rand(w.shape, generator=generator) for n, w in weights.items()}


SCORES = {"magnitude": magnitude_scores, "random": random_scores}


def pruned_layers(backbone: nn.Module, first_convs: int = 0) -> list[str] | None:
    """Layerwise pruning (Caron et al. 2020, F7): the names of the first `first_convs` Conv2d
    weights in module order (input side), or None for every prunable layer (first_convs = 0)."""
    if not first_convs:
        return None
    convs = [f"{name}.weight" for name, m in backbone.named_modules() if isinstance(m, nn.Conv2d)]
    if first_convs > len(convs):
        raise ValueError(f"only {len(convs)} conv layers, asked to prune the first {first_convs}")
    return convs[:first_convs]


def prune(scores: dict[str, torch.Tensor], mask: Mask, fraction: float, layers: list[str] | None = None,
          scope: str = "global") -> Mask:
    """Remove round(fraction * surviving) weights: those with the lowest score among the surviving
    ones, globally. Exactly that many, whatever the ties (e.g. many weights at exactly zero).
    `layers` restricts pruning (and the count) to those weights; the others are left as they are.
    scope "layer": each of those layers on its own instead, round(fraction * its survivors) of its
    lowest (every pruned layer keeps the same density, to one weight).

    Selection by NumPy's argpartition on the surviving scores: linear time, and unlike
    torch.quantile it has no 2^24-element limit (a ResNet-50 has ~25M prunable weights)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    names = list(mask) if layers is None else [n for n in mask if n in layers]
    if scope == "layer":
        out = {n: m.clone() for n, m in mask.items()}
        for n in names:   # a layer already at one weight or none stays as it is (round(0.2 * 1) = 0)
            out[n] = prune({n: scores[n]}, {n: mask[n]}, fraction)[n]
        return out
    if scope != "global":
        raise ValueError(f"scope must be global or layer, got {scope!r}")
    alive = torch.cat([mask[n].flatten() for n in names])                    # (N,) bool, N weights
    k = int(round(fraction * int(alive.sum())))
    if k == 0:
        return {n: m.clone() for n, m in mask.items()}
    flat = torch.cat([scores[n].flatten().float() for n in names])
    if not bool(torch.isfinite(flat[alive]).all()):
        raise ValueError("non-finite scores among the surviving weights: the weights they come from diverged")
    # Pruned weights score +inf, so the k smallest are k survivors; one flat array, one selection.
    flat = flat.masked_fill_(~alive, float("inf"))
    drop = torch.from_numpy(np.argpartition(flat.numpy(), k - 1, kind="introselect")[:k])  # the k smallest
    alive[drop] = False
    out = dict(zip(names, torch.split(alive, [mask[n].numel() for n in names])))  # views of one buffer
    return {n: out[n].view_as(m) if n in out else m.clone() for n, m in mask.items()}


def prune_iteratively(backbone: nn.Module, levels: int, fraction: float, score: str = "magnitude",
                      generator: torch.Generator | None = None) -> Mask:
    """`levels` rounds of `prune` from dense, scoring the backbone's current weights each round:
    a level-L mask without the training in between (benchmarks and tests)."""
    mask = dense_mask(backbone)
    for _ in range(levels):
        mask = prune(SCORES[score](prunable(backbone), generator), mask, fraction)
    return mask


def apply_mask(backbone: nn.Module, mask: Mask) -> None:
    """Zero every pruned weight in place."""
    weights = prunable(backbone)
    with torch.no_grad():
        for n, m in mask.items():
            weights[n].mul_(m.to(weights[n].device))


class MaskEnforcer:
    """Keeps pruned weights at exactly zero after each optimizer step: one multi-tensor multiply.
    Built once per run so the float masks live on the training device. gradients(), before the
    step, takes the pruned weights' gradients out too: an element-wise optimizer (SGD, Adam) never
    lets them reach a kept weight, but a layer-wise one does (LARS's trust ratio divides by the
    whole layer's gradient norm), and the pruned sub-network must train as if alone."""

    def __init__(self, backbone: nn.Module, mask: Mask):
        weights = prunable(backbone)
        missing = set(mask) ^ set(weights)
        if missing:
            raise ValueError(f"mask and backbone disagree on {sorted(missing)[:3]}")
        pruned = [n for n in weights if not bool(mask[n].all())]   # fully dense layers need no work
        self.weights = [weights[n] for n in pruned]
        # same device, dtype and memory format (e.g. channels_last) as each weight: a plain multiply
        self.masks = [torch.empty_like(weights[n]).copy_(mask[n]) for n in pruned]

    @torch.no_grad()
    def __call__(self) -> None:
        if self.weights:
            torch._foreach_mul_(self.weights, self.masks)

    @torch.no_grad()
    def gradients(self) -> None:
        grads = [(w.grad, m) for w, m in zip(self.weights, self.masks) if w.grad is not None]
        if grads:
            torch._foreach_mul_([g for g, _ in grads], [m for _, m in grads])


def density(mask: Mask, layers: list[str] | None = None) -> float:
    """Fraction of prunable weights kept (in `layers` only, when given)."""
    ms = [m for n, m in mask.items() if layers is None or n in layers]
    return sum(int(m.sum()) for m in ms) / sum(m.numel() for m in ms)


def report(mask: Mask, layers: list[str] | None = None) -> list[dict]:
    """Per-layer and total density: [{'layer', 'kept', 'total', 'density'}, ..., total row], and a
    'pruned layers' row when pruning is restricted to `layers`."""
    rows = [{"layer": n, "kept": int(m.sum()), "total": m.numel(), "density": float(m.float().mean())}
            for n, m in mask.items()]
    totals = [("total", rows)]
    if layers is not None:
        totals.append(("pruned layers", [r for r in rows if r["layer"] in layers]))
    for name, rs in totals:
        kept, total = sum(r["kept"] for r in rs), sum(r["total"] for r in rs)
        rows = rows + [{"layer": name, "kept": kept, "total": total, "density": kept / total}]
    return rows
