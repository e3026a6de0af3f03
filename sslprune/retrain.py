"""Mask evaluation (Caron et al. 2020, Fig. 3): re-train a level's mask on labels.

The pretext head is dropped and a fresh label head added, so a mask found by any objective is
judged the same way. The variants (`sslprune retrain RUN --variants ...`; a sweep's `retrain = [...]`):
the backbone starts from
- rewind: the rewind point of the run that found the mask (the winning ticket), under the mask;
- reinit: a random re-initialisation under the mask;
- random: a random mask at the same density (nested across levels), random init: the baseline;
- random_adjusted: the same, but the naturally-zero weights of the replicate's trained dense
  network (level 0, |w| <= machine epsilon) are pruned first, then random others (the paper's
  baseline adjusted for natural sparsity).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
from pathlib import Path

import torch

from . import channels, layout
from .config import PRESETS, Experiment
from .config import Data as DataConfig
from .config import Train as TrainConfig
from .data import Dataset
from .errors import UserError
from .lottery import build, derive_seed, open_run, record_command, save_mask
from .pruning import SCORES, Mask, dense_mask, prunable, prune, pruned_layers
from .runtime import CPU, Runtime
from .sparsity import adjusted_random_scores, natural_zeros
from .stacked import Job, train_stacked
from .train import load_weights

VARIANTS = ("rewind", "reinit", "random", "random_adjusted")
RANDOM_MASKS = ("random", "random_adjusted")


def random_mask(exp: Experiment, exp_dir: Path, backbone, replicate: int, level: int,
                variant: str = "random") -> Mask:
    """Level L's random mask: level L-1's mask with `fraction` of its survivors removed at random
    (random_adjusted: naturally-zero weights first), globally (--scope layer: in each layer alone,
    as many as the lottery's layer keeps). Nested across levels, and each
    level keeps exactly as many weights as the lottery's (channels with --channel-round: about as
    many, in the same blocks). Computed once per level from the
    previous one, then read from disk."""
    path = layout.random_mask(layout.level_dir(exp_dir, replicate, level), variant)
    if path.exists():
        return layout.load_mask(path)
    if level == 0:
        mask = dense_mask(backbone)
    else:
        previous = random_mask(exp, exp_dir, backbone, replicate, level - 1, variant)
        if exp.prune.granularity == "channel":  # random channels, as many as the lottery's level keeps
            generator = torch.Generator().manual_seed(derive_seed("random-channels", replicate, level))
            mask = channels.next_mask(backbone, previous, None, exp.prune.fraction, "random", generator,
                                      exp.prune.channel_round)
        else:
            if variant == "random":
                generator = torch.Generator().manual_seed(derive_seed("random-mask", replicate, level))
                scores = SCORES["random"](prunable(backbone), generator)
            else:
                generator = torch.Generator().manual_seed(derive_seed("adjusted-random-mask", replicate, level))
                scores = adjusted_random_scores(natural_zeros(_dense_trained(exp_dir, replicate, backbone)), generator)
            mask = prune(scores, previous, exp.prune.fraction, pruned_layers(backbone, exp.prune.layers),
                         exp.prune.scope)   # layer scope: each layer keeps as many as the lottery's
    save_mask(path, mask)
    return mask


def _dense_trained(exp_dir: Path, replicate: int, backbone) -> dict[str, torch.Tensor]:
    """The prunable weights of the replicate's trained dense network (level 0)."""
    run = layout.run_dir(layout.level_dir(exp_dir, replicate, 0))
    if not layout.is_done(run):
        raise UserError(f"level 0 of replicate {replicate} is not trained yet; run 'sslprune lottery' first")
    trained = layout.load_model(run)
    return {n: trained[f"backbone.{n}"] for n in prunable(backbone)}


def retrain_settings(exp: Experiment) -> tuple[TrainConfig, DataConfig]:
    """The training settings a run's masks are re-trained with: the run's own, or with --retrain-as P
    preset P's (optimizer, schedule, batch, epochs, crop and flip), so that masks found by objectives
    with other schedules (Exemplar, NPID, RotNet on ImageNet) are judged under one labels schedule."""
    if not exp.prune.retrain_as:
        return exp.train, exp.data
    like = Experiment.from_flat(PRESETS[exp.prune.retrain_as])
    return like.train, dataclasses.replace(exp.data, crop_pad=like.data.crop_pad, flip=like.data.flip)


def retrain(exp: Experiment, exp_dir: Path, data: Dataset, replicate: int, level: int, variant: str,
            runtime: Runtime = CPU, progress: bool = True) -> dict:
    return retrain_many(exp, exp_dir, data, [(replicate, level, variant)], runtime, progress)[0]


def retrain_many(exp: Experiment, exp_dir: Path, data: Dataset, items: list[tuple[int, int, str]],
                 runtime: Runtime = CPU, progress: bool = True) -> list[dict]:
    """The re-trainings (replicate, level, variant) of one run, `runtime.stack` of them at a time
    trained as one network where they can be (sslprune/stacked.py); each one's final metrics."""
    for _, _, variant in items:
        if variant not in VARIANTS:
            raise UserError(f"unknown variant '{variant}'; choose one of: {', '.join(VARIANTS)}")
        if variant == "random_adjusted" and exp.prune.granularity == "channel":
            raise UserError("random_adjusted prunes naturally-zero single weights first; a channel run's random "
                            "baseline is --variants random (random channels)")
    unique = list(dict.fromkeys(items))   # one item twice in a stack would wait on its own lock
    k, finals = max(1, runtime.stack), {}
    cfg, aug = retrain_settings(exp)
    for chunk in (unique[i:i + k] for i in range(0, len(unique), k)):
        with contextlib.ExitStack() as held:   # one writer per re-training; sorted: no two stacks deadlock
            for replicate, level, variant in sorted(chunk):
                ldir = layout.level_dir(exp_dir, replicate, level)
                held.enter_context(layout.step_guard(layout.step_lock(ldir, layout.run_dir(ldir, variant).name)))
            jobs = [_job(exp, exp_dir, data, *item) for item in chunk]
            finals |= zip(chunk, train_stacked(jobs, data, cfg, aug, runtime, progress))
    return [finals[item] for item in items]


def _job(exp: Experiment, exp_dir: Path, data: Dataset, replicate: int, level: int, variant: str) -> Job:
    """A re-training as train() takes it: a fresh label head on the variant's backbone and mask;
    the data order is the replicate's, the same for every variant and level."""
    ldir = layout.level_dir(exp_dir, replicate, level)
    backbone, task = build(exp, data, seed=derive_seed("retrain", variant, replicate, level), task_name="labels")
    if variant in RANDOM_MASKS:
        mask = random_mask(exp, exp_dir, backbone, replicate, level, variant)
    else:
        if not (ldir / layout.MASK).exists():
            raise UserError(f"no mask at {ldir}; run 'sslprune lottery' up to level {level} first")
        mask = layout.load_mask(ldir / layout.MASK)
    if variant == "rewind":
        load_weights(backbone, None, layout.load_rewind(exp_dir, replicate))  # backbone only: the head is fresh
    return Job(backbone, task, mask, layout.run_dir(ldir, variant), seed=replicate)


def retrain_run(exp_dir: Path, variants: list[str], replicates: list[int] | None = None, levels: list[int] | None = None,
                data_root: str | None = None, runtime: Runtime = CPU, progress: bool = True,
                command: list[str] | None = None) -> list[tuple[int, int, str, dict]]:
    """`sslprune retrain`: every (replicate, level, variant), levels default to the trained ones.
    `command` is recorded in config.json once the checks pass. Returns each one's final metrics."""
    exp, _, data = open_run(exp_dir, data_root)
    have = layout.replicates(exp_dir)
    reps = [r for r in have if not replicates or r in replicates]
    if not reps or set(replicates or ()) - set(have):
        missing = sorted(set(replicates or ()) - set(have))
        raise UserError(f"{exp_dir} has no replicate {', '.join(map(str, missing)) or 'at all'} (it has "
                        f"{', '.join(map(str, have)) or 'none'}); run 'sslprune lottery' for it first")
    trained = layout.trained_levels(exp_dir)
    items = [(r, level, variant) for r in reps
             for level in (levels if levels is not None else [lv for rr, lv in trained if rr == r])
             for variant in variants]
    unmasked = sorted({(r, lv) for r, lv, v in items if v not in RANDOM_MASKS    # random masks need no lottery level
                       and not (layout.level_dir(exp_dir, r, lv) / layout.MASK).exists()})
    if unmasked:  # before any lock: a lock file would make the level's folder
        raise UserError(f"{exp_dir} has no mask for " + ", ".join(f"replicate {r} level {lv}" for r, lv in unmasked[:4])
                        + (", ..." if len(unmasked) > 4 else "") + "; run 'sslprune lottery' up to those levels first")
    if command is not None:
        record_command(exp_dir, command)
    return [(*item, final) for item, final in zip(items, retrain_many(exp, exp_dir, data, items, runtime, progress))]


class Retrain:
    """The registry's entry (sslprune/evaluations.py): `sslprune retrain RUN --variants ...`, and a
    sweep's `retrain = [variants]`, one step per variant and level."""
    name, top_level = "retrain", True
    help = "re-train masks of a lottery run on labels"
    description = ("For each level: re-train the mask on labels with a fresh label head, from the winning "
                   "ticket (rewind), a random re-init (reinit), a random mask at the same density (random), "
                   "or one that prunes the trained dense network's naturally-zero weights first "
                   "(random_adjusted). Results go next to each level.")

    def spec(self, value, where: str, here: Path, experiments: list[Experiment]) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise UserError(f"{where} must be a list of variants, e.g. [\"rewind\", \"random\"], got {value!r}")
        bad = [v for v in value if v not in VARIANTS]
        if bad:
            raise UserError(f"{where}: unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
        if "random_adjusted" in value and any(e.prune.granularity == "channel" for e in experiments):
            raise UserError(f"{where}: random_adjusted prunes naturally-zero single weights; a channel run's "
                            f"random baseline is 'random' (random channels): drop random_adjusted")
        return tuple(value)

    def at(self, variant: str, experiment, level: int) -> bool:
        return True

    def label(self, sweep, step) -> str:
        return self.out(sweep, step).name

    def out(self, sweep, step) -> Path:
        return layout.run_dir(sweep.level_dir(step), sweep.item(step))

    def train_dirs(self, sweep, step) -> list[Path]:
        return [self.out(sweep, step)]

    def run(self, sweep, step) -> None:
        """With --stack K, up to K-1 of the level's other variants that no worker has taken train
        with this one, as one network."""
        exp, variants = step.experiment, sweep.spec.evaluations[step.kind]
        others = [dataclasses.replace(step, item=i) for i in range(len(variants)) if i != step.item]
        with sweep.claim(others, sweep.runtime.stack - 1) as taken:
            retrain_many(exp, sweep.exp_dir(exp), sweep.dataset(exp),
                         [(s.replicate, s.level, sweep.item(s)) for s in (step, *taken)], sweep.runtime, False)

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        from .cli import common_flags, run_args, stack_flag, words
        run_args(p)
        p.add_argument("--variants", type=words(*VARIANTS), default=["rewind", "reinit", "random"], metavar="A,B",
                       help="which re-trainings, comma-separated: rewind (the winning ticket), reinit (its mask, "
                       "new weights), random (a random mask at the same density), random_adjusted (a random mask "
                       "that prunes the trained dense network's naturally-zero weights first) "
                       "[default: rewind,reinit,random]")
        p.add_argument("--reset", dest="reset_misused", default=None, help=argparse.SUPPRESS)  # lottery's; refused
        p.add_argument("--data-root", default=None, help="override the data root saved with the run")
        common_flags(p)
        stack_flag(p)

    def command(self, args, argv: list[str]) -> int:
        from .cli import runtime_of
        if args.reset_misused is not None:  # the flag's old name here, and lottery's flag of one value
            raise UserError(f"retrain takes --variants {args.reset_misused} (which re-trainings to run); "
                            f"--reset is lottery's (how each level starts)")
        retrain_run(args.run_dir, args.variants, args.replicates, args.level, args.data_root, runtime_of(args),
                    not args.quiet, list(argv))
        print(args.run_dir)
        return 0


RETRAIN = Retrain()
