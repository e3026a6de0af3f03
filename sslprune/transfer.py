"""Transfer (Caron et al. 2020, Fig. 2), two arms on a target dataset:

- fine-tune (`finetune`): a level's trained, pruned backbone gets a fresh label head for the target
  classes and every surviving weight is fine-tuned on the target task, the mask held fixed;
- pruning during transfer: the *dense* pre-trained backbone is pruned by iterative magnitude
  pruning on the target task itself. That is a lottery run on the target data started from the
  run's level-0 weights: `sslprune lottery --pretrained RUN --task labels --dataset ... --rewind 0it`
  (replicate r starts from RUN's replicate r; every level restarts from the pre-trained weights).

The report puts both arms in one table and plot per target dataset ('transfer D').

The fine-tuned result lives next to the level it starts from, in finetune_<data>_<hash>/ (hash of
the target data and the fine-tuning configuration), as a training run: resumable, idempotent.

A sweep names a target dataset in a table of DATA_KEYS ([[evaluations.finetune]], and the probe's
[[evaluations.probe]]): target_tables checks them, sweep_target loads one.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
from pathlib import Path

from . import layout
from .config import Data as DataConfig
from .config import Experiment, stable_repr
from .config import Task as TaskConfig
from .config import Train as TrainConfig
from .data import Dataset, load_dataset
from .errors import UserError
from .runtime import CPU, Runtime
from .lottery import build, derive_seed, load_experiment, open_run, pick_levels, record_command
from .train import load_weights, train


DATA_KEYS = {"dataset", "data_root", "image_size", "train_per_class", "test_per_class"}
OVERRIDES = {f.name for f in dataclasses.fields(TrainConfig)} | {"crop_pad", "flip"}   # of the run's settings


def finetune_config(exp: Experiment, overrides: dict) -> tuple[TrainConfig, DataConfig]:
    """The run's training and augmentation settings with `overrides` (Train fields, crop_pad, flip;
    from `eval finetune`'s flags or a sweep's [[evaluations.finetune]]), checked as a run on labels."""
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = dataclasses.replace(exp.train, **{k: v for k, v in overrides.items() if k in train_fields})
    aug = dataclasses.replace(exp.data, stream=False,  # the target dataset is read into memory
                              **{k: overrides[k] for k in ("crop_pad", "flip") if k in overrides})
    dataclasses.replace(exp, data=aug, task=TaskConfig(task="labels"), train=cfg).validate()
    return cfg, aug


def finetune_out(level: Path, data: Dataset, cfg: TrainConfig, aug: DataConfig) -> Path:
    """The folder of a level's fine-tuning on `data` with these settings (named by layout.finetune_dir)."""
    key = f"{data.fingerprint()}|{stable_repr(cfg)}|{aug.crop_pad}|{aug.flip}"  # repr: the names of older folders
    return layout.finetune_dir(level, data.name, hashlib.sha256(key.encode()).hexdigest())


def finetune(exp_dir: Path, replicate: int, level: int, data: Dataset, cfg: TrainConfig, aug: DataConfig,
             runtime: Runtime = CPU, progress: bool = True) -> dict:
    """Fine-tune level `level`'s trained backbone under its mask on `data` with a fresh label head."""
    exp, _ = load_experiment(exp_dir)
    ldir = layout.level_dir(exp_dir, replicate, level)
    if not layout.is_done(layout.run_dir(ldir)):
        raise UserError(f"level {level} of replicate {replicate} is not trained; run 'sslprune lottery' first")
    backbone, task = build(exp, data, seed=derive_seed("finetune", replicate, level), task_name="labels")
    load_weights(backbone, None, layout.load_model(layout.run_dir(ldir)))
    mask = layout.load_mask(ldir / layout.MASK)
    out = finetune_out(ldir, data, cfg, aug)
    with layout.step_guard(layout.step_lock(ldir, out.name)):  # one writer; a second one waits
        return train(backbone, task, data, cfg, aug, mask, out, seed=replicate, runtime=runtime, progress=progress)


def finetune_run(exp_dir: Path, target: DataConfig, target_root: str | None, overrides: dict,
                 replicates: list[int] | None = None, levels: list[int] | None = None, runtime: Runtime = CPU,
                 progress: bool = True, command: list[str] | None = None,
                 image_size: int | None = None) -> tuple[Dataset, list[tuple[int, int, dict]]]:
    """`sslprune eval finetune`: every trained level fine-tuned on `target` at `image_size` (None:
    the run's; 0: native) with the run's training settings and `overrides` (finetune_config)."""
    exp, _, own = open_run(exp_dir)
    pairs = pick_levels(exp_dir, replicates, levels)
    cfg, aug = finetune_config(exp, overrides)
    size = own.train.image_shape[-1] if image_size is None else image_size
    data = load_dataset(dataclasses.replace(target, image_size=size), target_root)
    if aug.crop_pad >= data.train.image_shape[-1]:
        raise UserError(f"--crop-pad {aug.crop_pad} is not smaller than the {data.train.image_shape[-1]}-pixel "
                        f"target images; pass a smaller --crop-pad")
    if command is not None:
        record_command(exp_dir, command)
    return data, [(r, level, finetune(exp_dir, r, level, data, cfg, aug, runtime, progress)) for r, level in pairs]


def target_tables(name: str, value, where: str, here: Path, extra: set[str]) -> tuple[dict, ...]:
    """A sweep's [[evaluations.<name>]] tables, each checked: DATA_KEYS and `extra`, a dataset, and
    data_root made absolute (`here`: the spec's folder)."""
    out = []
    for table in value:
        if not isinstance(table, dict):
            raise UserError(f"{where} must be tables ([[evaluations.{name}]]), got {table!r}")
        unknown = set(table) - DATA_KEYS - extra
        if unknown:
            raise UserError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(DATA_KEYS | extra)}")
        if "dataset" not in table:
            raise UserError(f"{where} needs a dataset (e.g. dataset = \"imagefolder\")")
        t = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
        if t.get("data_root"):
            t["data_root"] = str(here / t["data_root"])
        out.append(t)
    return tuple(out)


def sweep_target(sweep, step) -> Dataset:
    """The dataset of a sweep step's table (target_tables), loaded once per worker; its image size
    defaults to the run's."""
    table = sweep.item(step)

    def load():
        size = table.get("image_size") or sweep.dataset(step.experiment).train.image_shape[-1]
        try:
            return load_dataset(DataConfig(**{k: table[k] for k in DATA_KEYS - {"data_root"} if k in table}
                                           | {"image_size": size}), table.get("data_root"))
        except UserError as e:  # its fix is in the spec, not in a flag
            raise UserError(f"{sweep.spec.path}: evaluations.{step.kind} table {step.item + 1}: {e}") from None
    return sweep.cached((step.kind, step.experiment.name(), step.item), load)


class Finetune:
    """The registry's entry (sslprune/evaluations.py): `sslprune eval finetune RUN --dataset ...`,
    and a sweep's [[evaluations.finetune]] tables (a dataset, training overrides), a step each per level."""
    name, top_level = "finetune", False
    help = "fine-tune each level's pruned network on a target dataset, mask fixed"
    description = ("Transfer, arm 1 (Caron et al. 2020, Fig. 2): each level's trained, pruned backbone gets "
                   "a fresh label head for the target classes and every surviving weight is fine-tuned on "
                   "the target labels, the mask held fixed. Arm 2, pruning during transfer, is a lottery run "
                   "on the target data started from the run's dense level-0 weights, replicate by "
                   "replicate: 'sslprune lottery --pretrained RUN --task labels --rewind 0it --dataset ...'. "
                   "Training flags default to the run's own.")

    def spec(self, value, where: str, here: Path, experiments: list[Experiment]) -> tuple[dict, ...]:
        tables = target_tables(self.name, value, where, here, OVERRIDES)
        for t in tables:  # the overrides make a valid training configuration for every experiment
            for exp in experiments:
                finetune_config(exp, t)
        return tables

    def at(self, table: dict, experiment, level: int) -> bool:
        return True

    def label(self, sweep, step) -> str:
        return layout.sweep_label(self.name, step.item + 1)

    def out(self, sweep, step) -> Path:
        return finetune_out(sweep.level_dir(step), sweep_target(sweep, step),
                            *finetune_config(step.experiment, sweep.item(step)))

    def train_dirs(self, sweep, step) -> list[Path]:
        return [self.out(sweep, step)]

    def run(self, sweep, step) -> None:
        exp = step.experiment
        finetune(sweep.exp_dir(exp), step.replicate, step.level, sweep_target(sweep, step),
                 *finetune_config(exp, sweep.item(step)), sweep.runtime, False)

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        from .cli import common_flags, evaluation_args, train_flags
        evaluation_args(p, required=True)
        train_flags(p)
        common_flags(p)

    def command(self, args, argv: list[str]) -> int:
        from .cli import runtime_of
        target = DataConfig(dataset=args.dataset, train_per_class=args.train_per_class,
                            test_per_class=args.test_per_class)
        data, results = finetune_run(args.run_dir, target, args.data_root,
                                     {k: getattr(args, k) for k in sorted(OVERRIDES) if getattr(args, k) is not None},
                                     args.replicates, args.level, runtime_of(args), not args.quiet, list(argv),
                                     args.image_size)
        for r, level, res in results:
            print(f"replicate {r} level {level}: fine-tuned on {data.name}: accuracy {res['test_acc']:.4f}, "
                  f"mean per-class {res['test_mean_class_acc']:.4f}")
        return 0


FINETUNE = Finetune()
