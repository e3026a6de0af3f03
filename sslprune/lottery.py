"""The level runner: init -> train (saving the rewind point) -> [prune -> reset -> train]*.

Level 0 trains the dense network and saves the weights after k updates (the rewind point).
Level L >= 1 prunes `fraction` of the weights surviving level L-1, by magnitude of level L-1's
trained weights, globally (--scope layer: each layer alone); resets the survivors (rewind: to the rewind point, the winning ticket
with late resetting of Frankle et al. 2019; reinit: a fresh random init, Liu et al. 2019) and
trains. Every step is idempotent: re-running the same command resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from . import channels, distributed, layout, tracking
from .config import Experiment, parse_rewind
from .config import Task as TaskConfig
from .data import Dataset
from .errors import UserError
from .runtime import CPU, Runtime
from .labelled import labelled_subset_checked, task_data
from .models import build_backbone, build_model, load_pretrained
from .models.checkpoints import describe
from .pruning import SCORES, Mask, dense_mask, density, prunable, prune, pruned_layers
from .pruning import report as density_report
from .tasks import TASKS, Task, build_task
from .train import load_weights, micro_batches, rewind_step, train, weights


def derive_seed(*parts) -> int:
    """A seed for one purpose (e.g. ('reinit', replicate, level)), independent of the others."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:8], 16)


def build(exp: Experiment, data: Dataset, seed: int, task_name: str | None = None) -> tuple[nn.Module, Task]:
    """A freshly initialised backbone and task (heads and state sized from `data`, the dataset the
    task trains on); the same seed gives the same weights. task_name overrides the experiment's
    task, with that task's default options (re-training on labels)."""
    torch.manual_seed(seed)
    backbone = build_backbone(exp)
    task_cfg = exp.task if task_name is None else TaskConfig(task=task_name)
    task = build_task(task_cfg, backbone.feature_dim, data.num_classes, len(data.train))
    return backbone, task


def check_schedule(exp: Experiment, levels: int) -> None:
    """A channel schedule that would empty a layer is refused before anything runs, and so is pruning
    a gated network (its gates already choose channels per image; pruning both is not a studied method)."""
    if exp.task.budget and levels:
        raise UserError("--budget trains one network with a dense and a gated path, not a pruning schedule: "
                        "pass --levels 0")
    if exp.prune.granularity == "channel":
        channels.check_levels(build_model(exp.model.model), exp.prune.fraction, levels, exp.prune.channel_round)
    else:  # whole weights: a level that keeps less than one is no level
        backbone = build_model(exp.model.model)
        convs = sum(isinstance(m, nn.Conv2d) for m in backbone.modules())
        names = pruned_layers(backbone, min(exp.prune.layers, convs))  # too many --layers: check_data says so
        n = sum(w.numel() for name, w in prunable(backbone).items() if names is None or name in names)
        if n * (1 - exp.prune.fraction) ** levels < 1:
            most = math.floor(math.log(1 / n) / math.log(1 - exp.prune.fraction))
            raise UserError(f"--levels {levels} would keep {n * (1 - exp.prune.fraction) ** levels:.2g} of the "
                            f"{n} prunable weights, less than one; pass at most --levels {most}")


def prepare(exp: Experiment, root: Path, data: Dataset, data_root: str | None, argv: list[str],
            runtime: Runtime | None = None) -> Path:
    """Create (or re-open) the experiment directory, after every check that can fail. A saved
    config or dataset that differs from the one asked for is an error: nothing computed is touched."""
    exp.validate()
    check_data(exp, data)
    with layout.file_lock(layout.experiment_lock(Path(root) / exp.name())):  # one writer of config.json at a time
        return _prepare(exp, Path(root), data, data_root, argv, runtime)


def _prepare(exp: Experiment, root: Path, data: Dataset, data_root: str | None, argv: list[str],
             runtime: Runtime | None) -> Path:
    exp_dir = Path(root) / exp.name()
    cfg_path = exp_dir / layout.CONFIG
    fingerprint = data.fingerprint()
    pretrained = pretrained_id(exp.model.pretrained) if exp.model.pretrained else None
    ran = runtime.fingerprint() if runtime is not None else None
    if cfg_path.exists():
        saved_exp, saved = load_experiment(exp_dir)
        if saved_exp != exp:
            raise UserError(f"{cfg_path} holds a different configuration than the one asked for "
                            f"(same name {exp.name()}); use another --root or move {exp_dir} away")
        check_same_data(exp_dir, saved, data)
        started = saved.get("pretrained_id")
        if started != pretrained:
            raise UserError(f"--pretrained {exp.model.pretrained} is not what {exp_dir} started from "
                            f"({started}, now {pretrained}); restore it or use another --root")
        if ran is not None and saved.get("runtime", ran) != ran:  # one experiment, one arithmetic
            raise UserError(f"{exp_dir} trains under {_runtime_text(saved['runtime'])}, not "
                            f"{_runtime_text(ran)}: its levels would mix them; pass the same runtime flags "
                            f"(--device, --precision, --channels-last, --compile) or use another --root")
        record_command(exp_dir, argv, saved)
        return exp_dir
    layout.save_json(cfg_path, {
        "name": exp.name(), "hash": exp.hash(), "config": exp.to_dict(), "data_fingerprint": fingerprint,
        "data_root": str(Path(data_root).resolve()) if data_root else None, "data_name": data.name,
        "pretrained_id": pretrained, "input": input_record(data), "runtime": ran,
        "git": _git_sha(), "commands": [argv], "versions": _versions()})
    return exp_dir


def _runtime_text(r: dict) -> str:
    return (f"{r['device']}, {r['precision']}, {'channels_last' if r['channels_last'] else 'NCHW'}"
            f"{', compiled' if r['compile'] else ''}")


def input_record(data: Dataset) -> dict:
    """What the network sees: image shape and the training set's channel statistics (0-1 scale),
    kept so that an exported network normalises its inputs as training did."""
    mean, std = data.channel_stats()
    return {"shape": list(data.train.image_shape), "mean": mean.tolist(), "std": std.tolist()}


def source_run(exp: Experiment) -> Path | None:
    """The lottery run a --pretrained directory names (replicate r starts from its replicate r's
    trained level 0: pruning during transfer, paired seed by seed), or None for a file / no start."""
    p = Path(exp.model.pretrained) if exp.model.pretrained else None
    return p if p is not None and p.is_dir() else None


def pretrained_prefix(exp: Experiment) -> str | None:
    """--pretrained-prefix as checkpoints.load takes it: None = detect, '' = keys as they are."""
    p = exp.model.pretrained_prefix
    return None if not p else "" if p == "none" else p


def pretrained_file(exp: Experiment, replicate: int) -> Path:
    """The weights replicate `replicate` starts from."""
    src = source_run(exp)
    if src is None:
        return Path(exp.model.pretrained)
    train_dir = layout.run_dir(layout.level_dir(src, replicate, 0))
    if not layout.is_done(train_dir):
        raise UserError(f"--pretrained {src}: level 0 of replicate {replicate} is not trained there; run "
                        f"'sslprune lottery' on it with --replicates {replicate} --levels 0 first")
    return train_dir / layout.MODEL


def pretrained_id(path: str) -> str:
    """What a run started from, to refuse a changed start on re-run: a file's sha256, or a source
    run's configuration hash and data fingerprint."""
    p = Path(path)
    if p.is_dir():
        _, saved = load_experiment(p)
        return f"run {saved['hash']} data {saved.get('data_fingerprint')}"
    if not p.is_file():
        raise UserError(f"--pretrained {path} is neither a file nor a lottery run directory; pass a "
                        f"model.safetensors, a .pth state dict or a directory printed by 'sslprune lottery'")
    return f"sha256 {_sha256(p)}"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_data(exp: Experiment, data: Dataset) -> None:
    h, w = data.train.image_shape[-2:]
    if data.num_classes < 2:
        raise UserError(f"{data.name} has {data.num_classes} class: nothing to tell apart (every accuracy would "
                        f"be 1.0); an ImageFolder needs one sub-folder per class in train/ and test/")
    if exp.train.batch_size > len(data.train):
        raise UserError(f"--batch-size {exp.train.batch_size} exceeds the {len(data.train)} training images; "
                        f"pass at most {len(data.train)}")
    TASKS[exp.task.task].check_data(exp.task, exp.train, data)
    # the rewind point within training, before anything is written: in epochs exactly, in updates against
    # a bound (at most one update per image: the objective's own share of the data is taken later, and
    # train() checks the exact count)
    count, unit = parse_rewind(exp.prune.rewind)
    if count > exp.train.epochs * (1 if unit == "ep" else len(data.train)):
        raise UserError(f"--rewind {exp.prune.rewind} lies past the end of training ({exp.train.epochs} epochs); "
                        f"choose an earlier --rewind")
    if exp.task.label_fraction:
        labelled_subset_checked(exp, data)
    if source_run(exp) is not None:  # a run: same architecture; its replicates are checked as they start
        src, _ = load_experiment(source_run(exp))
        if src.model.model != exp.model.model:
            raise UserError(f"--pretrained {exp.model.pretrained} trained --model {src.model.model}, not "
                            f"{exp.model.model}; pass --model {src.model.model}")
    elif exp.model.pretrained:  # fails here, before anything is written, if it does not fit
        pretrained_id(exp.model.pretrained)
        load_pretrained(build_model(exp.model.model), exp.model.pretrained, pretrained_prefix(exp))
    if exp.prune.layers:
        try:
            pruned_layers(build_model(exp.model.model), exp.prune.layers)
        except ValueError as e:
            raise UserError(f"--layers {exp.prune.layers}: {exp.model.model} has {e}; pass a smaller --layers") from None
    if exp.data.crop_pad >= h:
        raise UserError(f"--crop-pad {exp.data.crop_pad} is not smaller than the {h}-pixel images")


def record_command(exp_dir: Path, argv: list[str], saved: dict | None = None) -> None:
    """Append a command line to config.json: every command that touched the results is kept.
    `saved` (prepare's) is read under the experiment's lock; otherwise the file is read under it."""
    exp_dir = Path(exp_dir)
    cfg_path = exp_dir / layout.CONFIG
    if saved is None:
        with layout.file_lock(layout.experiment_lock(exp_dir)):
            record_command(exp_dir, argv, layout.load_json(cfg_path))
        return
    saved["commands"] = saved.get("commands", []) + [argv]
    layout.save_json(cfg_path, saved)


def check_same_data(exp_dir: Path, saved: dict, data: Dataset) -> None:
    """The one rule for every command that reads a run's data again: it is the data recorded when
    the experiment was created (runs from before the record are taken as they are)."""
    recorded, found = saved.get("data_fingerprint"), data.fingerprint()
    if recorded not in (None, found):
        raise UserError(f"{exp_dir} was trained on other data (fingerprint {recorded}, now {found}); pass the "
                        f"data root it used ({saved.get('data_root')}) or use another --root")


def open_run(exp_dir: Path, data_root: str | None = None) -> tuple[Experiment, dict, Dataset]:
    """An experiment, its config.json, and the data it trained on (read from `data_root` or where
    it was; checked to be that data)."""
    from .data import load_dataset
    exp, saved = load_experiment(exp_dir)
    data = load_dataset(exp.data, data_root or saved.get("data_root"))
    check_same_data(exp_dir, saved, data)
    return exp, saved, data


def pick_levels(exp_dir: Path, replicates: list[int] | None, levels: list[int] | None,
                available: list[tuple[int, int]] | None = None, what: str = "trained") -> list[tuple[int, int]]:
    """(replicate, level) of the `available` levels (default: the trained ones) an evaluation runs on,
    None = all of them; a replicate or level asked for by name and not there is refused, never skipped."""
    have = layout.trained_levels(exp_dir) if available is None else available
    ready = {r for r, _ in have}

    def refuse(kind, missing, there):
        raise UserError(f"{exp_dir} has no {what} {kind} {', '.join(map(str, missing))} ({what}: "
                        f"{', '.join(map(str, sorted(there))) or 'none'}); ask for those, or run 'sslprune lottery' further")

    if missing := sorted(set(replicates or ()) - ready):
        refuse("replicate", missing, ready)
    # the replicates taken: those asked for, else all, one still training its level 0 included
    taken = sorted(set(replicates) if replicates is not None else
                   ready | (set(layout.replicates(exp_dir)) if available is None else set()))
    asked = sorted(set(levels or ()))
    if nowhere := [lv for lv in asked if not any((r, lv) in have for r in taken)]:
        refuse("level", nowhere, {lv for r, lv in have if r in taken})
    # each level asked for in each replicate taken: a replicate still on its way is named, not dropped
    if gaps := [(r, lv) for r in taken for lv in asked if (r, lv) not in have]:
        whole = [r for r in taken if all((r, lv) in have for lv in asked)]
        # '--replicates 2' would mean 1..2: one replicate alone is written '2-2'
        ask = (f"--replicates {whole[0]}-{whole[0]}" if len(whole) == 1 else
               f"--replicates {','.join(map(str, whole))}" if whole else "other levels")
        raise UserError(f"{exp_dir} has no {what} level {gaps[0][1]} in replicate {gaps[0][0]}"
                        f"{f' (and {len(gaps) - 1} more pairs)' if len(gaps) > 1 else ''}; ask for {ask}, "
                        f"or run 'sslprune lottery' further")
    pairs = [(r, lv) for r, lv in have if r in taken and (levels is None or lv in levels)]
    if not pairs:
        raise UserError(f"no {what} level matches in {exp_dir}; run 'sslprune lottery' first")
    return pairs


def load_experiment(exp_dir: Path) -> tuple[Experiment, dict]:
    cfg_path = Path(exp_dir) / layout.CONFIG
    if not cfg_path.exists():
        raise UserError(f"{exp_dir} is not an experiment directory (no {layout.CONFIG}); pass the "
                        f"directory that 'sslprune lottery' printed")
    saved = layout.load_json(cfg_path)
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise UserError(f"{cfg_path} holds no experiment configuration (a {type(saved).__name__}"
                        f"{' without config' if isinstance(saved, dict) else ''}): it was damaged or replaced; "
                        f"restore it, or move {exp_dir} away")
    return Experiment.from_dict(saved["config"]), saved


def level_mask(exp: Experiment, exp_dir: Path, replicate: int, level: int, backbone: nn.Module) -> Mask:
    """Mask of `level`, computed from level-1's trained weights once, then read from disk."""
    path = layout.level_dir(exp_dir, replicate, level) / layout.MASK
    if path.exists():
        return layout.load_mask(path)
    if level == 0:
        mask = dense_mask(backbone)
    else:
        prev = layout.level_dir(exp_dir, replicate, level - 1)
        if not layout.is_done(layout.run_dir(prev)):
            raise UserError(f"level {level - 1} of replicate {replicate} is not trained yet; run "
                            f"'sslprune lottery' with --levels {level} first")
        trained = layout.load_model(layout.run_dir(prev))
        if not all(bool(torch.isfinite(v).all()) for v in trained.values() if v.is_floating_point()):
            raise UserError(f"{layout.run_dir(prev) / layout.MODEL} holds non-finite weights: level {level - 1} "
                            f"diverged; nothing is pruned from it. Move {prev} away and re-run with a lower --lr")
        previous = level_mask(exp, exp_dir, replicate, level - 1, backbone)
        if exp.prune.granularity == "channel":
            state = {k.removeprefix("backbone."): v for k, v in trained.items() if k.startswith("backbone.")}
            mask = channels.next_mask(backbone, previous, state, exp.prune.fraction, exp.prune.channel_score,
                                      round_to=exp.prune.channel_round)
        else:
            scores = SCORES["magnitude"]({n: trained[f"backbone.{n}"] for n in prunable(backbone)})
            mask = prune(scores, previous, exp.prune.fraction, pruned_layers(backbone, exp.prune.layers),
                         exp.prune.scope)
    save_mask(path, mask, pruned_layers(backbone, exp.prune.layers))
    return mask


def save_mask(path: Path, mask: Mask, layers: list[str] | None = None) -> None:
    """The mask, then density.json beside it: kept / total per layer, in total and over the pruned
    layers, and the mask's sha256 (its seal, checked on every read)."""
    layout.save_tensors(path, mask)
    layout.save_json(path.parent / layout.DENSITY, {"layers": density_report(mask, layers), **layout.seal(path)})


def run_replicate(exp: Experiment, exp_dir: Path, data: Dataset, replicate: int, levels: int,
                  runtime: Runtime = CPU, progress: bool = True) -> None:
    """data: the full dataset; the objective trains on task_data(exp, exp_dir, data). One process
    runs a replicate's chain at a time: a second identical command waits, then finds it done."""
    with layout.step_guard(layout.replicate_lock(exp_dir, replicate)):
        _run_replicate(exp, exp_dir, data, replicate, levels, runtime, progress)


def _run_replicate(exp: Experiment, exp_dir: Path, data: Dataset, replicate: int, levels: int,
                   runtime: Runtime, progress: bool) -> None:
    data = task_data(exp, exp_dir, data)
    rdir = layout.replicate_dir(exp_dir, replicate)
    for folder in [rdir, *(d for r, _, d in layout.levels(exp_dir) if r == replicate)]:  # left by a killed
        # run of this chain (its lock is ours now); by the one process that writes (another rank's
        # cleaning would delete rank 0's temporary while it writes: measured, 2 runs in 10 under torchrun)
        if distributed.is_main():
            layout.clean_temporaries(folder)
    backbone, task = build(exp, data, seed=derive_seed("init", replicate))
    init_path = rdir / layout.INIT
    if init_path.exists():
        if source_run(exp) is not None and (rdir / layout.PRETRAINED).exists():
            # the source's level 0 re-trained since: the two transfer arms would no longer be paired
            was = layout.load_json(rdir / layout.PRETRAINED)
            if Path(was["file"]).exists() and _sha256(Path(was["file"])) != was["sha256"]:
                raise UserError(f"{was['file']} changed since replicate {replicate} of {exp_dir} started "
                                f"from it; restore it, or move {rdir} away to start that replicate again")
        load_weights(backbone, task, layout.load_tensors(init_path))
    else:
        if exp.model.pretrained:  # Hubens et al.: level 0 fine-tunes a pre-trained backbone, fresh head
            start = pretrained_file(exp, replicate)
            loaded = load_pretrained(backbone, start, pretrained_prefix(exp))
            if distributed.is_main():  # what was taken from the file, and what was left (heads, projectors)
                print(f"replicate {replicate}: {describe(loaded)}", file=sys.stderr)
            layout.save_json(rdir / layout.PRETRAINED, {"file": str(start), "sha256": _sha256(start), "loaded": loaded})
        layout.save_tensors(init_path, weights(backbone, task))
    distributed.barrier()  # rank 0 has written init.safetensors before anyone reads it
    k = rewind_step(exp.prune.rewind, task.sampler.steps_per_epoch(data.train.labels, exp.train.batch_size))

    for level in range(levels + 1):
        out = layout.run_dir(layout.level_dir(exp_dir, replicate, level))
        mask = level_mask(exp, exp_dir, replicate, level, backbone)
        if layout.is_done(out):
            continue
        empty = [n for n, m in mask.items() if not bool(m.any())]
        if empty and distributed.is_main():  # magnitude ranks globally: a small layer can go whole
            print(f"warning: replicate {replicate} level {level} ({density(mask):.2%} left): no weight left in "
                  f"{', '.join(empty)}; the network passes no signal there, and this level and deeper ones "
                  f"measure a disconnected network", file=sys.stderr)
        if level == 0:
            load_weights(backbone, task, layout.load_tensors(init_path))
        elif exp.prune.reset == "rewind":
            load_weights(backbone, task, layout.load_rewind(exp_dir, replicate))
        else:  # reinit: fresh weights from the init distribution, a new draw per level
            backbone, task = build(exp, data, seed=derive_seed("reinit", replicate, level))
        t0 = time.perf_counter()
        final = train(backbone, task, data, exp.train, exp.data, mask, out, seed=replicate, runtime=runtime,
                      snapshot=(k, rdir / layout.REWIND) if level == 0 else None, progress=progress)
        if progress and distributed.is_main():  # one line per level, terminal or not
            tracking.level_line(out, density(mask), final, task.metric, time.perf_counter() - t0)


def lottery_run(exp: Experiment, root: Path, data_root: str | None, levels: int, replicates: list[int],
                runtime: Runtime = CPU, progress: bool = True, command: list[str] = ("lottery",)) -> Path:
    """`sslprune lottery`: levels 0..`levels` of each replicate, after every check that can fail
    (nothing is written before). Returns the experiment directory."""
    from .data import load_dataset
    exp.validate()                         # before reading any data
    check_schedule(exp, levels)
    width = TASKS[exp.task.task].sampler.width(exp.train.batch_size)
    distributed.check_batch(width)
    micro_batches(width, exp.train.accumulate)  # --accumulate's parts split evenly over the processes
    if source_run(exp) is not None:        # every replicate's start exists
        for replicate in replicates:
            pretrained_file(exp, replicate)
    data = load_dataset(exp.data, data_root)
    exp_dir = prepare(exp, root, data, data_root, list(command), runtime)
    distributed.barrier()                  # config.json is written before any rank goes on
    for replicate in replicates:
        run_replicate(exp, exp_dir, data, replicate, levels, runtime, progress)
    return exp_dir


def _git_sha() -> str:
    """The revision of the code that ran, '+dirty' when it had uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip()
    try:
        sha = git("rev-parse", "HEAD")
        return (sha + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for pkg in ("sslprune", "torch", "numpy", "safetensors", "scikit-learn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
