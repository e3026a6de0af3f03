"""Mask evaluation (Caron et al. 2020, Fig. 3): re-train a level's mask on labels.

The pretext head is dropped and a fresh label head added, so a mask found by any objective is
judged the same way. The backbone starts from
- rewind: the rewind point of the run that found the mask (the winning ticket), under the mask;
- reinit: a random re-initialisation under the mask;
- random: a random mask at the same density (nested across levels), random init: the baseline.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import layout
from .config import Experiment
from .data import Dataset
from .errors import UserError
from .lottery import build, derive_seed
from .pruning import SCORES, Mask, dense_mask, prunable, prune
from .train import load_weights, train

RESETS = ("rewind", "reinit", "random")


def random_mask(exp: Experiment, exp_dir: Path, backbone, replicate: int, level: int) -> Mask:
    """Level L's random mask: level L-1's random mask with `fraction` of its survivors removed at
    random, globally. Nested across levels, and each level keeps exactly as many weights as the
    lottery's. Computed once per level from the previous one, then read from disk."""
    path = layout.level_dir(exp_dir, replicate, level) / "retrain_random" / layout.MASK
    if path.exists():
        return layout.load_tensors(path)
    if level == 0:
        mask = dense_mask(backbone)
    else:
        generator = torch.Generator().manual_seed(derive_seed("random-mask", replicate, level))
        mask = prune(SCORES["random"](prunable(backbone), generator),
                     random_mask(exp, exp_dir, backbone, replicate, level - 1), exp.prune.fraction)
    layout.save_tensors(path, mask)
    return mask


def retrain(exp: Experiment, exp_dir: Path, data: Dataset, replicate: int, level: int, reset: str,
            device: str = "cpu", progress: bool = True) -> dict:
    if reset not in RESETS:
        raise UserError(f"unknown reset '{reset}'; choose one of: {', '.join(RESETS)}")
    ldir = layout.level_dir(exp_dir, replicate, level)
    out = ldir / f"retrain_{reset}"
    seed = derive_seed("retrain", reset, replicate, level)
    backbone, task = build(exp, data, seed=seed, task_name="labels")
    if reset == "random":
        mask = random_mask(exp, exp_dir, backbone, replicate, level)
    else:
        if not (ldir / layout.MASK).exists():
            raise UserError(f"no mask at {ldir}; run 'sslprune lottery' up to level {level} first")
        mask = layout.load_tensors(ldir / layout.MASK)
    if reset == "rewind":
        rewind = layout.replicate_dir(exp_dir, replicate) / layout.REWIND
        load_weights(backbone, None, layout.load_tensors(rewind))  # backbone only: the head is fresh
    return train(backbone, task, data, exp.train, exp.data, mask, out, seed=replicate, device=device,
                 progress=progress)
