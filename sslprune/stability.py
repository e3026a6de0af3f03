"""Linear-mode-connectivity instability of a level's ticket (Frankle et al. 2020, "Linear Mode
Connectivity and the Lottery Ticket Hypothesis").

Two copies start from the weights level L's training starts from (the rewind point, or the level's
re-initialisation, under its mask) and are trained with the run's own objective and schedule under
two different data orders and augmentations. The straight line between their final weights is
evaluated at `points` evenly spaced alphas; the error is 1 - the task's test metric (class, rotation,
kNN accuracy ...). instability = max error on the path - mean error of its two ends. A ticket is
stable (about 0) when SGD noise after the rewind point no longer decides which basin it ends in.

Copy 1 is the level's own training run whenever it started from those weights (every level >= 1,
and level 0 when the rewind point is the init), so one extra training per level is enough.

Batch-norm. The running statistics of an interpolated network are not its statistics: at each
point they are recomputed in train mode (momentum None: the exact average) over `bn_batches`
training batches as training sees them: the run's dataset augmentation (crop, flip), then the task's
own views (RotNet's rotations), as torch.optim.swa_utils.update_bn reads the training loader. Without
the augmentation the ends score below the trained networks (measured on the cifar10-cpu convnet:
RotNet 0.617 against 0.632 as trained, 0.633 with it; labels 0.476 against 0.482, 0.479 with it).
State that stands for the network's own outputs (NPID's memory bank) is rebuilt from the training
images (Task.rebuild_state). bn="keep" interpolates the stored statistics and the bank instead (then
the ends are exactly the two trained networks).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from . import distributed, layout
from .config import Data, Experiment
from .data import Dataset
from .data.augment import Normalize
from .errors import UserError
from .labelled import task_data
from .lottery import build, derive_seed, level_mask, open_run, pick_levels, record_command
from .runtime import CPU, Runtime
from .tasks import Batch, Task
from .train import draw_images, evaluate, load_weights, rewind_step, train, weights

BN_MODES = ("recompute", "keep")
SPEC_KEYS = {"level": list, "points": int, "bn": str, "bn_batches": int}   # a sweep's [evaluations.stability]


def interpolate(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) a + alpha b for floating tensors; others (batch counts) are a's. A weight both
    copies hold at zero (the mask) stays exactly zero."""
    return {k: torch.lerp(v, b[k], alpha) if v.is_floating_point() else v for k, v in a.items()}


def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recompute_batchnorm(backbone: nn.Module, task: Task, images: torch.Tensor, labels: torch.Tensor,
                        normalize: Normalize, batch_size: int, batches: int, aug: Data | None = None) -> None:
    """Replace every batch-norm layer's running statistics by their exact average over the first
    `batches` batches of `images` (B, 3, H, W uint8, in a fixed order), cropped and flipped as `aug`
    says (None: as they are) and seen through the task's own views in train mode, all drawn from a
    fixed seed. Nothing else changes: the task's other state is restored afterwards."""
    norms = _batchnorms(backbone) + _batchnorms(task)
    if not norms:
        return
    names = {name for name, m in task.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    kept = {k: v.clone() for k, v in task.state_dict().items() if k.rpartition(".")[0] not in names}
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None                                   # cumulative average, not exponential
    backbone.train(), task.train()
    generator = torch.Generator(device=images.device).manual_seed(0)   # the task's views, fixed
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).to(images.device)
    for i in range(min(batches, max(1, len(images) // batch_size))):  # full batches, as training sees them
        idx = order[i * batch_size:(i + 1) * batch_size]
        x = images[idx] if aug is None else draw_images(images, idx, aug, generator)   # (B, 3, H, W) uint8
        task.step(backbone, Batch(x, labels[idx], idx, generator), normalize)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    task.load_state_dict({**task.state_dict(), **kept})
    backbone.eval(), task.eval()


def path_metrics(backbone: nn.Module, task: Task, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                 data: Dataset, normalize: Normalize, alphas: list[float], batch_size: int,
                 bn: str = "recompute", bn_batches: int = 20, *, aug: Data | None) -> list[float]:
    """The task's test metric at each alpha on the line from weights a (alpha 0) to b (alpha 1);
    bn "recompute": batch-norm statistics from training batches under `aug`, the run's data config
    (None: the images as they are; asked for by name, so that no caller drops it unawares)."""
    device = next(backbone.parameters()).device
    train_x, train_y = data.train.images.to(device), data.train.labels.to(device)
    test_x, test_y = data.test.images.to(device), data.test.labels.to(device)
    out = []
    for alpha in alphas:
        load_weights(backbone, task, interpolate(a, b, alpha))
        if bn == "recompute":
            recompute_batchnorm(backbone, task, train_x, train_y, normalize, batch_size, bn_batches, aug)
            task.rebuild_state(backbone, train_x, normalize)
        test = evaluate(backbone, task, test_x, test_y, normalize,
                        batch_size if task.batch_metric else max(batch_size, 256), train_labels=train_y)
        out.append(test["acc"])
    return out


def instability(metrics: list[float]) -> float:
    """max error on the path - mean error of its ends (error = 1 - metric)."""
    errors = [1.0 - m for m in metrics]
    return max(errors) - (errors[0] + errors[-1]) / 2


def check_options(points: int, bn: str, bn_batches: int, exp: Experiment | None = None) -> None:
    """Refuse, before anything runs or is recorded, settings eval stability cannot use."""
    if points < 3:
        raise UserError(f"--points must be at least 3 (the two ends and one between), got {points}")
    if bn not in BN_MODES:
        raise UserError(f"unknown --bn '{bn}'; choose one of: {', '.join(BN_MODES)}")
    if bn_batches < 1:
        raise UserError(f"--bn-batches must be at least 1, got {bn_batches}")
    if distributed.world() > 1:
        raise UserError("eval stability runs on one process; start it without torchrun")
    if exp is not None and exp.data.stream:
        raise UserError("eval stability recomputes batch-norm statistics from training images held in memory, "
                        "and this run's data is streamed from disk (--stream); it cannot run on it")


def level_stability(exp: Experiment, exp_dir: Path, data: Dataset, replicate: int, level: int,
                    runtime: Runtime = CPU, points: int = 11, bn: str = "recompute", bn_batches: int = 20,
                    progress: bool = True) -> dict:
    """Instability of level `level`'s ticket; idempotent: level_<L>/stability/done.json, beside the
    second copy's training run. data: the full dataset (the objective's share is taken here)."""
    check_options(points, bn, bn_batches, exp)
    ldir = layout.level_dir(exp_dir, replicate, level)
    if not layout.is_done(layout.run_dir(ldir)):
        raise UserError(f"level {level} of replicate {replicate} is not trained; run 'sslprune lottery' first")
    out = layout.stability_dir(ldir)
    with layout.step_guard(layout.step_lock(ldir, out.name)):   # one writer at a time
        if layout.is_done(out):
            return _same_options(layout.load_json(out / layout.DONE), exp, _options(points, bn, bn_batches, exp),
                                 out, exp_dir)
        return _level_stability(exp, exp_dir, data, replicate, level, runtime, points, bn, bn_batches, progress, out)


def _model_seal(run: Path) -> str | None:
    """The sha256 a finished run's done.json records for its model (None: none recorded)."""
    files = layout.load_json(run / layout.DONE).get("files", {}) if layout.is_done(run) else {}
    return (files.get(layout.MODEL) or {}).get("sha256")


def _augmentation(exp: Experiment) -> dict:
    return {"crop_pad": exp.data.crop_pad, "flip": exp.data.flip}


def _options(points: int, bn: str, bn_batches: int, exp: Experiment) -> dict:
    """How a measurement is made, as a finished one records it and must match to be served again."""
    recompute = bn == "recompute"
    return {"points": points, "bn": bn, "bn_batches": bn_batches if recompute else None,
            "bn_augmentation": _augmentation(exp) if recompute else None}


def bn_description(done: dict) -> str:
    """How a finished measurement set the batch-norm statistics on its path, in words (the report's)."""
    had = _recorded(done)
    if had["bn"] != "recompute":
        return had["bn"]
    aug = had["bn_augmentation"]
    views = " + ".join(([f"crop {aug['crop_pad']}"] if aug["crop_pad"] else []) + (["flip"] if aug["flip"] else []))
    return f"recompute, {had['bn_batches']} batches, {views or 'unaugmented'}"


def _recorded(done: dict) -> dict:
    recompute = done["bn"] == "recompute"
    # measurements from before the augmentation was recorded recomputed from the images as they are
    return {"points": len(done["alphas"]), "bn": done["bn"], "bn_batches": done["bn_batches"] if recompute else None,
            "bn_augmentation": done.get("bn_augmentation", {"crop_pad": 0, "flip": False}) if recompute else None}


def _same_options(done: dict, exp: Experiment, want: dict, out: Path, exp_dir: Path) -> dict:
    """A finished measurement, if it was made as asked for now, on the copies there now; else refused
    (never another path's numbers under these options, nor the path between networks since
    retrained). Measurements from before copy seals were recorded pass."""
    for run, sealed in zip(done.get("copies", []), done.get("copies_sealed", [])):
        if sealed is not None and _model_seal(Path(exp_dir) / run) != sealed:
            raise UserError(f"{out} was measured between other networks than {Path(exp_dir) / run} holds now "
                            f"(retrained since); move {out} away to measure again")
    had = _recorded(done)
    if had == want:
        return done
    again = (f"delete {out / layout.DONE} to measure the path again (its copies are read back, nothing is "
             f"retrained)")
    if had["bn_augmentation"] not in (None, _augmentation(exp)):   # no options of today measure it that way
        raise UserError(f"{out} recomputed batch-norm statistics under other augmentation than this run's "
                        f"({had['bn_augmentation']}; an earlier sslprune used none); {again}")
    made = f"--points {had['points']} --bn {had['bn']}" + (
        f" --bn-batches {had['bn_batches']}" if had["bn_batches"] is not None else "")
    raise UserError(f"{out} was measured with {made}; ask for those, or {again}")


def _start(exp: Experiment, exp_dir: Path, data: Dataset, replicate: int, level: int) -> tuple[nn.Module, Task]:
    """A backbone and task holding what level `level`'s training starts from (before its mask)."""
    if level > 0 and exp.prune.reset == "reinit":   # the level's own draw, as the lottery made it
        return build(exp, data, seed=derive_seed("reinit", replicate, level))
    backbone, task = build(exp, data, seed=0)
    load_weights(backbone, task, layout.load_rewind(exp_dir, replicate))
    return backbone, task


def _level_stability(exp: Experiment, exp_dir: Path, data: Dataset, replicate: int, level: int, runtime: Runtime,
                     points: int, bn: str, bn_batches: int, progress: bool, out: Path) -> dict:
    data = task_data(exp, exp_dir, data)
    backbone, task = build(exp, data, seed=0)
    mask = level_mask(exp, exp_dir, replicate, level, backbone)
    per_epoch = task.sampler.steps_per_epoch(data.train.labels, exp.train.batch_size)
    k = rewind_step(exp.prune.rewind, per_epoch)
    own = layout.run_dir(layout.level_dir(exp_dir, replicate, level))
    # copy 1: the level's own run when it started from the same weights, with the same seed
    ldir = layout.level_dir(exp_dir, replicate, level)
    copies = [(own if level > 0 or k == 0 else layout.stability_copy(ldir, 1), replicate),
              (layout.stability_copy(ldir, 2), derive_seed("stability", replicate, level))]
    ends, trained = [], []
    for run, seed in copies:
        net, head = _start(exp, exp_dir, data, replicate, level)
        trained.append(train(net, head, data, exp.train, exp.data, mask, run, seed=seed, runtime=runtime,
                             progress=progress)["test_acc"])
        ends.append({name: t.cpu() for name, t in weights(net, head).items()})
    rt = runtime.resolved()
    backbone, task = backbone.to(rt.device), task.to(rt.device)
    normalize = Normalize(*data.channel_stats()).to(rt.device)
    alphas = [i / (points - 1) for i in range(points)]
    with rt.autocast():   # the precision training evaluated the copies in: the ends compare to theirs
        metrics = path_metrics(backbone, task, *[{name: t.to(rt.device) for name, t in e.items()} for e in ends],
                               data, normalize, alphas, exp.train.batch_size, bn, bn_batches,
                               aug=exp.data)
    result = {"instability": instability(metrics), "alphas": alphas, "test_acc": metrics,
              "error": [1.0 - m for m in metrics], "ends_trained_acc": trained, "metric": task.metric,
              "rewind": exp.prune.rewind, "rewind_step": k,
              "rewind_epochs": k / per_epoch, "reset": exp.prune.reset, "bn": bn, "bn_batches": bn_batches,
              "bn_augmentation": _options(points, bn, bn_batches, exp)["bn_augmentation"],
              "copies": [str(run.relative_to(exp_dir)) for run, _ in copies],
              "seeds": [seed for _, seed in copies], "copies_sealed": [_model_seal(run) for run, _ in copies]}
    layout.save_json(out / layout.DONE, result)
    return result


def stability_run(exp_dir: Path, replicates: list[int] | None = None, levels: list[int] | None = None,
                  runtime: Runtime = CPU, points: int = 11, bn: str = "recompute", bn_batches: int = 20,
                  progress: bool = True, command: list[str] | None = None) -> list[tuple[int, int, dict]]:
    """`sslprune eval stability`: every trained level's instability."""
    exp, _, data = open_run(exp_dir)
    check_options(points, bn, bn_batches, exp)
    pairs = pick_levels(exp_dir, replicates, levels)
    if command is not None:
        record_command(exp_dir, command)
    return [(r, level, level_stability(exp, exp_dir, data, r, level, runtime, points, bn, bn_batches, progress))
            for r, level in pairs]


class Stability:
    """The registry's entry (sslprune/evaluations.py): `sslprune eval stability RUN`, and a sweep's
    [evaluations.stability] table (SPEC_KEYS), a step per level it names."""
    name, top_level = "stability", False
    help = "linear-mode-connectivity instability of each level's ticket"
    description = ("Frankle et al. 2020: two copies of a level's ticket, started from the weights its "
                   "training starts from (the rewind point under its mask), trained with the run's objective "
                   "under two data orders and augmentations (copy 1 is the level's own run where it started "
                   "there); the task's test error along the straight line between them, batch-norm "
                   "statistics recomputed at each point. instability = max error on the path - mean error of "
                   "the ends; about 0: stable. For the rewind point's effect, run lotteries with different "
                   "--rewind and measure each; 'sslprune report' plots instability against the rewind point.")

    def spec(self, value, where: str, here: Path, experiments: list[Experiment]) -> tuple[dict]:
        """One table, checked (its values as 'eval stability' checks them, at run time)."""
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a table ([evaluations.stability]), got {value!r}")
        for key, v in value.items():
            kind = SPEC_KEYS.get(key)
            if kind is None:
                raise UserError(f"{where}: unknown key '{key}'; known: {sorted(SPEC_KEYS)}")
            if not isinstance(v, kind) or isinstance(v, bool) or (
                    kind is list and not all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
                raise UserError(f"{where}.{key} must be {'a list of levels' if kind is list else kind.__name__}, "
                                f"got {v!r}")
        if value.get("bn", "recompute") not in BN_MODES:
            raise UserError(f"{where}.bn must be one of {', '.join(BN_MODES)}, got {value['bn']!r}")
        try:
            for exp in experiments:
                check_options(value.get("points", 11), value.get("bn", "recompute"), value.get("bn_batches", 20), exp)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        return (dict(value),)

    def at(self, table: dict, experiment, level: int) -> bool:
        return level in table.get("level", [level])   # default: every level

    def label(self, sweep, step) -> str:
        return self.out(sweep, step).name

    def out(self, sweep, step) -> Path:
        out = layout.stability_dir(sweep.level_dir(step))
        if layout.is_done(out):  # measured under other options: no result of this table, refused
            t = {"points": 11, "bn": "recompute", "bn_batches": 20} | sweep.item(step)   # level_stability's defaults
            _same_options(layout.load_json(out / layout.DONE), step.experiment,
                          _options(t["points"], t["bn"], t["bn_batches"], step.experiment), out,
                          sweep.exp_dir(step.experiment))
        return out

    def train_dirs(self, sweep, step) -> list[Path]:
        return [c for c in (layout.stability_copy(sweep.level_dir(step), i) for i in (1, 2)) if c.exists()]

    def run(self, sweep, step) -> None:
        exp, options = step.experiment, {k: v for k, v in sweep.item(step).items() if k != "level"}
        level_stability(exp, sweep.exp_dir(exp), sweep.dataset(exp), step.replicate, step.level, sweep.runtime,
                        progress=False, **options)

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        from .cli import common_flags, run_args
        run_args(p)
        p.add_argument("--points", type=int, default=11, help="evenly spaced points on the path, ends included "
                       "[default: 11]")
        p.add_argument("--bn", default="recompute", choices=BN_MODES, help="batch-norm statistics at each point: "
                       "recomputed from training batches under the run's augmentation, or the copies' own "
                       "interpolated [default: recompute]")
        p.add_argument("--bn-batches", type=int, default=20, help="training batches that recompute them [default: 20]")
        common_flags(p)

    def command(self, args, argv: list[str]) -> int:
        from .cli import runtime_of
        for r, level, res in stability_run(args.run_dir, args.replicates, args.level, runtime_of(args), args.points,
                                           args.bn, args.bn_batches, not args.quiet, list(argv)):
            path = " ".join(f"{m:.3f}" for m in res["test_acc"])
            ends = "/".join(f"{a:.3f}" for a in res["ends_trained_acc"])
            print(f"replicate {r} level {level}: instability {res['instability']:.4f} (rewind {res['rewind']}; "
                  f"{res['metric']} along the path: {path}; the copies as trained: {ends})")
        return 0


STABILITY = Stability()
