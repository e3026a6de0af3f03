"""Linear probe: how much label information a trained (pruned) backbone's frozen features hold.

Features come from the backbone in eval mode (batch-norm uses its running statistics, nothing is
updated) under torch.no_grad, without augmentation. The classifier is scikit-learn's multinomial
logistic regression on standardised features; its inverse regularisation C is chosen on a held-out
fifth of the training split (stratified, fixed seed), then refitted on the whole training split.
The test split is touched once, at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import layout
from .config import Data
from .data import Dataset, Split, load_dataset
from .data.augment import Normalize
from .errors import UserError
from .lottery import load_experiment, open_run, pick_levels, record_command
from .models import build_backbone
from .models.gated import GatedResNet, gate_statistics
from .train import load_weights
from .transfer import sweep_target, target_tables

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
GATED = "gated"   # the stage name of a gated backbone's gated path


@torch.no_grad()
def features(backbone: nn.Module, images: torch.Tensor, normalize: Normalize, batch_size: int = 256,
             stage: str | None = None) -> np.ndarray:
    """(N, 3, H, W) uint8 -> (N, F) float32 features of the frozen backbone: its output, or the
    output of the submodule `stage` (e.g. 'layer2' of a ResNet), global-average-pooled to (N, C);
    stage GATED: the final features of a gated backbone's gated path (models/gated.py)."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    captured = []
    hook = None
    gated = stage == GATED
    if stage and not gated:
        # a copy: a following in-place op (ReLU(inplace=True) after a batch-norm) would overwrite it
        hook = stage_module(backbone, stage).register_forward_hook(lambda m, i, o: captured.append(o.clone()))
    out = []
    try:
        for i in range(0, len(images), batch_size):
            captured.clear()
            x = normalize(images[i:i + batch_size].to(device))
            f = backbone(x, path="gated") if gated else backbone(x)
            if stage and not gated:
                if len(captured) != 1:
                    raise UserError(f"--stage {stage} ran {len(captured)} times in one forward pass; pick a "
                                    f"module that runs once (e.g. layer2 of a ResNet)")
                f = captured.pop()
                f = f.mean((2, 3)) if f.ndim == 4 else f.flatten(1)   # (B, C, H, W) -> (B, C)
            out.append(f.float().cpu())
    finally:
        if hook is not None:
            hook.remove()
        backbone.train(was_training)
    return torch.cat(out).numpy()


def stage_module(backbone: nn.Module, stage: str) -> nn.Module:
    if stage == GATED:
        if not isinstance(backbone, GatedResNet):
            raise UserError(f"--stage {GATED} probes the gated path of a run trained with --budget; this run has "
                            f"none: drop --stage")
        return backbone
    try:
        return backbone.get_submodule(stage)
    except AttributeError:
        names = [n for n, _ in backbone.named_modules() if n and n.count(".") <= 1]
        raise UserError(f"--stage '{stage}' is no module of this backbone; choose one of: "
                        f"{', '.join(names[:40])}") from None


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
              seed: int = 0) -> dict:
    """Returns test accuracy, mean per-class accuracy, the chosen C and its validation accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def model(c):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))

    counts = np.bincount(train_y)
    if counts[counts > 0].min() < 2 or len(train_y) // 5 < len(counts[counts > 0]):
        raise UserError(f"the probe holds out a fifth of the training images per class to choose its "
                        f"regularisation: {len(train_y)} images, as few as {counts[counts > 0].min()} in a class, "
                        f"are too few; use more training images per class")
    fit_x, val_x, fit_y, val_y = train_test_split(train_x, train_y, test_size=0.2, random_state=seed,
                                                  stratify=train_y)
    scores = {c: model(c).fit(fit_x, fit_y).score(val_x, val_y) for c in C_GRID}
    best = max(C_GRID, key=lambda c: (scores[c], -c))  # ties: the stronger regularisation
    pred = model(best).fit(train_x, train_y).predict(test_x)
    per_class = [float((pred[test_y == k] == k).mean()) for k in np.unique(test_y)]
    return {"acc": float((pred == test_y).mean()), "mean_class_acc": float(np.mean(per_class)),
            "C": best, "val_acc": scores[best]}


def probe_out(level: Path, data: Dataset, stage: str | None = None) -> Path:
    """The folder of a level's probe on `data` (named by layout.probe_dir)."""
    return layout.probe_dir(level, data.name, data.fingerprint(), stage)


def probe_level(exp_dir: Path, replicate: int, level: int, data: Dataset, normalize: Normalize,
                device: str = "cpu", stage: str | None = None) -> dict:
    """Probe the backbone that level `level` of a lottery run trained, on `data`'s labels (all of
    them: the probe is an evaluation, whatever labels the objective saw). Idempotent: the result
    is level_<L>/probe_<data>.../done.json, next to the features it was fitted on."""
    if not isinstance(data.train, Split):
        raise UserError("a linear probe fits on features of training images held in memory, and this run's "
                        "data is streamed from disk: probe on another dataset (--dataset, --data-root)")
    out = probe_out(layout.level_dir(exp_dir, replicate, level), data, stage)
    with layout.file_lock(layout.step_lock(out.parent, out.name)):  # one writer; a second one waits
        return _probe(exp_dir, replicate, level, data, normalize, device, stage, out)


def _probe(exp_dir: Path, replicate: int, level: int, data: Dataset, normalize: Normalize, device: str,
           stage: str | None, out: Path) -> dict:
    if layout.is_done(out):
        return layout.load_json(out / layout.DONE)
    run = layout.run_dir(layout.level_dir(exp_dir, replicate, level))
    if not layout.is_done(run):
        raise UserError(f"level {level} of replicate {replicate} is not trained; run 'sslprune lottery' first")
    cache = out / "features.safetensors"
    exp, _ = load_experiment(exp_dir)
    backbone, norm = build_backbone(exp).to(device), normalize.to(device)
    load_weights(backbone, None, layout.load_model(run))
    if cache.exists():
        f = layout.load_tensors(cache)
    else:
        f = {"train": torch.from_numpy(features(backbone, data.train.images, norm, stage=stage)),
             "test": torch.from_numpy(features(backbone, data.test.images, norm, stage=stage))}
        layout.save_tensors(cache, f)
    fit = fit_probe(f["train"].numpy(), data.train.labels.numpy(), f["test"].numpy(), data.test.labels.numpy())
    result = {"test_acc": fit["acc"], "test_mean_class_acc": fit["mean_class_acc"], "C": fit["C"],
              "val_acc": fit["val_acc"], "dataset": data.name, "stage": stage, "n_train": len(data.train), "n_test": len(data.test),
              "classes": data.num_classes}
    if stage == GATED:  # what the gated path costs on these test images: realised MACs, gates per block
        result["gates"] = gate_statistics(backbone.eval(), data.test.images.to(device), norm, 256)
    layout.save_json(out / layout.DONE, result)
    return result


def probe_run(exp_dir: Path, target: Data | None = None, target_root: str | None = None, stage: str | None = None,
              replicates: list[int] | None = None, levels: list[int] | None = None, device: str = "cpu",
              command: list[str] | None = None, image_size: int | None = None) -> tuple[Dataset, list[tuple[int, int, dict]]]:
    """`sslprune eval probe`: every trained level's probe on the run's own data, or on `target`
    (a Data config: another dataset, or the run's own read differently) at `image_size` (None: the
    run's; 0: native). Images are standardised with the run's own training statistics."""
    exp, saved, own = open_run(exp_dir)
    pairs = pick_levels(exp_dir, replicates, levels)
    normalize = Normalize(*own.channel_stats())   # what the network was trained to see
    data = own
    if target is not None:
        size = own.train.image_shape[-1] if image_size is None else image_size
        data = load_dataset(dataclasses.replace(target, dataset=target.dataset or exp.data.dataset, image_size=size),
                            target_root or saved.get("data_root"))
    if stage:  # fail before any work
        stage_module(build_backbone(exp), stage)
    if command is not None:
        record_command(exp_dir, command)
    return data, [(r, level, probe_level(exp_dir, r, level, data, normalize, device, stage)) for r, level in pairs]


class Probe:
    """The registry's entry (sslprune/evaluations.py): `sslprune eval probe RUN`, and a sweep's
    [[evaluations.probe]] tables (a dataset, optionally a stage), a step each per level."""
    name, top_level = "probe", False
    help = "linear probe on frozen features, on the run's data or another dataset"
    description = ("Multinomial logistic regression on the frozen backbone's final features (batch-norm in "
                   "eval mode), regularisation chosen on a held-out fifth of the probe data's training "
                   "split; reports test accuracy and mean per-class accuracy. Features are computed once per "
                   "level and kept (features.safetensors). Images are standardised with the run's own "
                   "training statistics.")

    def spec(self, value, where: str, here: Path, experiments) -> tuple[dict, ...]:
        return target_tables(self.name, value, where, here, {"stage"})

    def at(self, table: dict, experiment, level: int) -> bool:
        return table.get("stage") != GATED or experiment.task.budget > 0   # the gated path: where there is one

    def label(self, sweep, step) -> str:
        return layout.sweep_label(self.name, step.item + 1)

    def out(self, sweep, step) -> Path:
        return probe_out(sweep.level_dir(step), sweep_target(sweep, step), sweep.item(step).get("stage"))

    def train_dirs(self, sweep, step) -> list[Path]:
        return []

    def run(self, sweep, step) -> None:
        exp = step.experiment
        probe_level(sweep.exp_dir(exp), step.replicate, step.level, sweep_target(sweep, step),
                    Normalize(*sweep.dataset(exp).channel_stats()), sweep.runtime.device, sweep.item(step).get("stage"))

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        from .cli import common_flags, evaluation_args
        evaluation_args(p, required=False)
        p.add_argument("--stage", default=None, help="probe the output of this backbone module instead of the "
                       "final features, global-average-pooled (e.g. layer1..layer4 of a ResNet, features.5 of "
                       f"the convnet); '{GATED}': the gated path's final features (a run trained with --budget) "
                       "[default: final features; of the dense path for a gated run]")
        common_flags(p, trains=False)

    def command(self, args, argv: list[str]) -> int:
        from .cli import check_device
        check_device(args.device)
        other = (args.dataset, args.data_root, args.image_size, args.train_per_class, args.test_per_class) != \
            (None, None, None, 0, 0)   # another dataset, or the run's own read differently
        target = Data(dataset=args.dataset or "", train_per_class=args.train_per_class,
                      test_per_class=args.test_per_class) if other else None
        data, results = probe_run(args.run_dir, target, args.data_root, args.stage, args.replicates, args.level,
                                  args.device, list(argv), args.image_size)
        for r, level, res in results:
            print(f"replicate {r} level {level}: probe on {data.name}{' @' + args.stage if args.stage else ''}: "
                  f"accuracy {res['test_acc']:.4f}, mean per-class {res['test_mean_class_acc']:.4f} (C={res['C']})")
        return 0


PROBE = Probe()
