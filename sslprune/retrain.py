"""Mask evaluation (Caron et al. 2020, Fig. 3): re-train a level's mask on labels.

The pretext head is dropped and a fresh label head added, so a mask found by any objective is
judged the same way. The backbone starts from
- rewind: the rewind point of the run that found the mask (the winning ticket), under the mask;
- reinit: a random re-initialisation under the mask;
- random: a random mask at the same density (nested across levels), random init: the baseline;
- random_adjusted: the same, but the naturally-zero weights of the replicate's trained dense
  network (level 0, |w| <= machine epsilon) are pruned first, then random others (the paper's
  baseline adjusted for natural sparsity).
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import channels, layout
from .config import Experiment
from .data import Dataset
from .errors import UserError
from .lottery import build, derive_seed, open_run, record_command, save_mask
from .pruning import SCORES, Mask, dense_mask, prunable, prune, pruned_layers
from .runtime import CPU, Runtime
from .sparsity import adjusted_random_scores, natural_zeros
from .train import load_weights, train

RESETS = ("rewind", "reinit", "random", "random_adjusted")
RANDOM_MASKS = ("random", "random_adjusted")


def random_mask(exp: Experiment, exp_dir: Path, backbone, replicate: int, level: int,
                reset: str = "random") -> Mask:
    """Level L's random mask: level L-1's mask with `fraction` of its survivors removed at random
    (random_adjusted: naturally-zero weights first), globally. Nested across levels, and each
    level keeps exactly as many weights as the lottery's (channels with --channel-round: about as
    many, in the same blocks). Computed once per level from the
    previous one, then read from disk."""
    path = layout.random_mask(layout.level_dir(exp_dir, replicate, level), reset)
    if path.exists():
        return layout.load_mask(path)
    if level == 0:
        mask = dense_mask(backbone)
    else:
        previous = random_mask(exp, exp_dir, backbone, replicate, level - 1, reset)
        if exp.prune.granularity == "channel":  # random channels, as many as the lottery's level keeps
            generator = torch.Generator().manual_seed(derive_seed("random-channels", replicate, level))
            mask = channels.next_mask(backbone, previous, None, exp.prune.fraction, "random", generator,
                                      exp.prune.channel_round)
        else:
            if reset == "random":
                generator = torch.Generator().manual_seed(derive_seed("random-mask", replicate, level))
                scores = SCORES["random"](prunable(backbone), generator)
            else:
                generator = torch.Generator().manual_seed(derive_seed("adjusted-random-mask", replicate, level))
                scores = adjusted_random_scores(natural_zeros(_dense_trained(exp_dir, replicate, backbone)), generator)
            mask = prune(scores, previous, exp.prune.fraction, pruned_layers(backbone, exp.prune.layers))
    save_mask(path, mask)
    return mask


def _dense_trained(exp_dir: Path, replicate: int, backbone) -> dict[str, torch.Tensor]:
    """The prunable weights of the replicate's trained dense network (level 0)."""
    run = layout.run_dir(layout.level_dir(exp_dir, replicate, 0))
    if not layout.is_done(run):
        raise UserError(f"level 0 of replicate {replicate} is not trained yet; run 'sslprune lottery' first")
    trained = layout.load_model(run)
    return {n: trained[f"backbone.{n}"] for n in prunable(backbone)}


def retrain(exp: Experiment, exp_dir: Path, data: Dataset, replicate: int, level: int, reset: str,
            runtime: Runtime = CPU, progress: bool = True) -> dict:
    if reset not in RESETS:
        raise UserError(f"unknown reset '{reset}'; choose one of: {', '.join(RESETS)}")
    if reset == "random_adjusted" and exp.prune.granularity == "channel":
        raise UserError("random_adjusted prunes naturally-zero single weights first; a channel run's random "
                        "baseline is --reset random (random channels)")
    ldir = layout.level_dir(exp_dir, replicate, level)
    with layout.step_guard(layout.step_lock(ldir, layout.run_dir(ldir, reset).name)):  # one writer at a time
        return _retrain(exp, exp_dir, data, replicate, level, reset, runtime, progress)


def _retrain(exp: Experiment, exp_dir: Path, data: Dataset, replicate: int, level: int, reset: str,
             runtime: Runtime, progress: bool) -> dict:
    ldir = layout.level_dir(exp_dir, replicate, level)
    out = layout.run_dir(ldir, reset)
    seed = derive_seed("retrain", reset, replicate, level)
    backbone, task = build(exp, data, seed=seed, task_name="labels")
    if reset in RANDOM_MASKS:
        mask = random_mask(exp, exp_dir, backbone, replicate, level, reset)
    else:
        if not (ldir / layout.MASK).exists():
            raise UserError(f"no mask at {ldir}; run 'sslprune lottery' up to level {level} first")
        mask = layout.load_mask(ldir / layout.MASK)
    if reset == "rewind":
        load_weights(backbone, None, layout.load_rewind(exp_dir, replicate))  # backbone only: the head is fresh
    return train(backbone, task, data, exp.train, exp.data, mask, out, seed=replicate, runtime=runtime,
                 progress=progress)


def retrain_run(exp_dir: Path, resets: list[str], replicates: list[int] | None = None, levels: list[int] | None = None,
                data_root: str | None = None, runtime: Runtime = CPU, progress: bool = True,
                command: list[str] | None = None) -> list[tuple[int, int, str, dict]]:
    """`sslprune retrain`: every (replicate, level, reset), levels default to the trained ones.
    `command` is recorded in config.json once the checks pass. Returns each one's final metrics."""
    exp, _, data = open_run(exp_dir, data_root)
    reps = [r for r in layout.replicates(exp_dir) if not replicates or r in replicates]
    if not reps:
        raise UserError(f"no matching replicates in {exp_dir}; run 'sslprune lottery' first")
    if command is not None:
        record_command(exp_dir, command)
    trained = layout.trained_levels(exp_dir)
    return [(r, level, reset, retrain(exp, exp_dir, data, r, level, reset, runtime, progress))
            for r in reps for level in (levels if levels is not None else [lv for rr, lv in trained if rr == r])
            for reset in resets]
