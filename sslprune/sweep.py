"""Sweeps: a declared grid of lottery runs and their evaluations, executed by independent workers
that share one run root (processes on this machine, or SLURM jobs through submitit).

A spec is a TOML file:

    root = "runs"                 # relative to the spec's folder
    data_root = "../data/cifar"   # optional, relative to the spec's folder
    levels = 3
    replicates = 3
    device = "cpu"                # or "cuda"

    [base]                        # lottery flags (config fields, or preset = "...")
    preset = "demo"

    [grid]                        # every combination is one experiment
    task = ["labels", "rotation"]

    [evaluations]
    retrain = ["rewind", "reinit", "random"]

    [[evaluations.probe]]         # a linear probe of every level (any number of these tables)
    dataset = "imagefolder"       # keys: dataset, data_root, image_size, train_per_class,
    data_root = "../data/caltech" #       test_per_class, stage
    image_size = 32               # default: the run's image size

    [[evaluations.finetune]]      # fine-tuning every level, mask fixed (any number)
    dataset = "imagefolder"       # the probe's data keys, and training overrides (epochs, lr, ...)
    data_root = "../data/caltech"
    epochs = 30

    [evaluations.stability]       # instability of the tickets (eval stability): one more training each
    level = [0, 5, 10]            # the levels it measures (default: every one); also points, bn, bn_batches

Steps are (experiment, replicate) lottery chains and (experiment, replicate, level, evaluation)
re-trainings, probes and fine-tunings; an evaluation waits until its level is trained. Each step is guarded by an exclusive
`flock` on its own lock file: a worker that cannot take it moves on, and a worker that dies (kill -9
included) loses its locks with its process, so another worker or the next run picks the step up
and resumes it from its last checkpoint. No step is ever computed by two workers at once, and a
finished step is never recomputed (its done.json is checked under the lock). Every worker appends
what it started and finished to ROOT/sweep_ledger.jsonl, which is what `sslprune sweep --status`
and the reuse report read. Locks need a file system with working flock (local disks, NFSv4,
Lustre with flock enabled).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
import tomllib
from pathlib import Path
from typing import Callable

from . import layout
from .config import Data, Experiment, Train, field_names, resolve
from .errors import UserError
from .runtime import Runtime

SPEC_KEYS = {"root", "data_root", "levels", "replicates", "device", "base", "grid", "evaluations"}
EVALUATIONS = {"retrain", "probe", "finetune", "stability"}
STABILITY_KEYS = {"level": list, "points": int, "bn": str, "bn_batches": int}
DATA_KEYS = {"dataset", "data_root", "image_size", "train_per_class", "test_per_class"}
LEDGER = "sweep_ledger.jsonl"


@dataclasses.dataclass(frozen=True)
class Spec:
    path: Path
    root: Path
    data_root: str | None
    levels: int
    replicates: int
    device: str
    experiments: tuple[Experiment, ...]
    retrain: tuple[str, ...]
    probe: tuple[dict, ...] = ()      # each: DATA_KEYS (data_root absolute) and optionally stage
    finetune: tuple[dict, ...] = ()   # each: DATA_KEYS and Train / crop_pad / flip overrides
    stability: dict | None = None     # STABILITY_KEYS; None: not measured


def load_spec(path: Path) -> Spec:
    """Read and check a spec: every key known, every experiment valid, before anything runs."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no sweep spec at {path}; pass a TOML file (see 'sslprune sweep --help')") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML ({e}); fix it") from None
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise UserError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(SPEC_KEYS)}")
    for key, least in (("levels", 0), ("replicates", 1)):
        value = raw.get(key, 3 if key == "levels" else 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise UserError(f"{path}: {key} must be a whole number >= {least}, got {value!r}")
    fields = field_names()   # levels and replicates are the spec's own keys, not [base]'s
    base, grid = dict(raw.get("base", {})), dict(raw.get("grid", {}))
    for key in [*base, *grid]:
        if key not in fields | {"preset"}:
            raise UserError(f"{path}: '{key}' is no configuration field; use the flag names without "
                            f"dashes (e.g. batch_size) or 'preset'")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{path}: grid.{key} must be a non-empty list of values")
    experiments = []
    for point in itertools.product(*[[(k, v) for v in vs] for k, vs in grid.items()]):
        exp, _ = resolve(dict(base) | dict(point), str(path), path.resolve().parent)   # as the CLI's flags
        exp.validate()
        from .lottery import check_schedule
        check_schedule(exp, int(raw.get("levels", 3)))
        experiments.append(exp)
    evaluations = raw.get("evaluations", {})
    unknown = set(evaluations) - EVALUATIONS
    if unknown:
        raise UserError(f"{path}: unknown evaluation(s) {sorted(unknown)}; known: {sorted(EVALUATIONS)}")
    retrain = tuple(evaluations.get("retrain", ()))
    from .retrain import RESETS
    bad = [r for r in retrain if r not in RESETS]
    if bad:
        raise UserError(f"{path}: unknown retrain reset(s) {bad}; choose from {', '.join(RESETS)}")
    if "random_adjusted" in retrain and any(e.prune.granularity == "channel" for e in experiments):
        raise UserError(f"{path}: random_adjusted prunes naturally-zero single weights; a channel run's random "
                        f"baseline is 'random' (random channels): drop random_adjusted")
    here = path.resolve().parent
    probe = tuple(_downstream(path, here, "probe", t, {"stage"}) for t in evaluations.get("probe", ()))
    finetune = tuple(_downstream(path, here, "finetune", t, _FINETUNE_KEYS) for t in evaluations.get("finetune", ()))
    from .transfer import finetune_config
    for t in finetune:  # the overrides make a valid training configuration for every experiment
        for exp in experiments:
            finetune_config(exp, t)
    stability = _stability(path, evaluations.get("stability"))
    data_root = raw.get("data_root")
    return Spec(path=path.resolve(), root=here / raw.get("root", "runs"),
                data_root=str(here / data_root) if data_root else None, levels=int(raw.get("levels", 3)),
                replicates=int(raw.get("replicates", 1)), device=raw.get("device", "cpu"),
                experiments=tuple(experiments), retrain=retrain, probe=probe, finetune=finetune, stability=stability)


def _stability(path: Path, table) -> dict | None:
    """[evaluations.stability], checked (its values as 'eval stability' checks them, at run time)."""
    if table is None:
        return None
    if not isinstance(table, dict):
        raise UserError(f"{path}: evaluations.stability must be a table ([evaluations.stability]), got {table!r}")
    for key, value in table.items():
        kind = STABILITY_KEYS.get(key)
        if kind is None:
            raise UserError(f"{path}: evaluations.stability: unknown key '{key}'; known: {sorted(STABILITY_KEYS)}")
        if not isinstance(value, kind) or isinstance(value, bool) or (
                kind is list and not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise UserError(f"{path}: evaluations.stability.{key} must be {'a list of levels' if kind is list else kind.__name__}, "
                            f"got {value!r}")
    from .stability import BN_MODES
    if table.get("bn", "recompute") not in BN_MODES:
        raise UserError(f"{path}: evaluations.stability.bn must be one of {', '.join(BN_MODES)}, got {table['bn']!r}")
    return dict(table)


_FINETUNE_KEYS = {f.name for f in dataclasses.fields(Train)} | {"crop_pad", "flip"}


def _downstream(path: Path, here: Path, kind: str, table, extra: set[str]) -> dict:
    """One [[evaluations.probe]] or [[evaluations.finetune]] table, checked; data_root made absolute."""
    if not isinstance(table, dict):
        raise UserError(f"{path}: evaluations.{kind} must be tables ([[evaluations.{kind}]]), got {table!r}")
    unknown = set(table) - DATA_KEYS - extra
    if unknown:
        raise UserError(f"{path}: evaluations.{kind}: unknown key(s) {sorted(unknown)}; known: "
                        f"{sorted(DATA_KEYS | extra)}")
    if "dataset" not in table:
        raise UserError(f"{path}: evaluations.{kind} needs a dataset (e.g. dataset = \"imagefolder\")")
    out = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    if out.get("data_root"):
        out["data_root"] = str(here / out["data_root"])
    return out


@dataclasses.dataclass
class Step:
    key: str                           # e.g. 'labels_convnet_digits_<hash>/replicate_1/level_2/retrain_reinit'
    lock: Path
    ready: Callable[[], bool]          # its inputs exist
    done: Callable[[], bool]
    run: Callable[[], None]
    train_dirs: Callable[[], list[Path]]  # the training runs it makes (epochs are counted there)
    level: int = -1                    # re-training: the level whose lottery it depends on


def _progress(train_dir: Path) -> int:
    """Epochs a training run has: all of them when done, else its checkpoint's, else 0."""
    if layout.is_done(train_dir):
        return layout.load_json(train_dir / layout.DONE)["epochs"]
    if (train_dir / layout.CHECKPOINT).exists():  # the epochs a resumed run will not train again
        return int(layout.load_checkpoint(train_dir / layout.CHECKPOINT)["epoch"])
    return 0


def plan(spec: Spec, runtime: Runtime) -> list[Step]:
    """Every step of the sweep, lottery chains first."""
    from .data import load_dataset
    from .data.augment import Normalize
    from .lottery import prepare, run_replicate
    from .probe import probe_level, probe_out
    from .retrain import retrain
    from .stability import level_stability
    from .transfer import finetune, finetune_config, finetune_out

    cache: dict = {}

    def data_for(exp):
        key = repr(exp.data)
        if key not in cache:
            cache[key] = load_dataset(exp.data, spec.data_root)
        return cache[key]

    def downstream(exp, kind: str, table: dict) -> tuple:
        """(data, level folder -> the evaluation's folder) of a probe or fine-tune table, read once per worker."""
        key = (kind, exp.name(), repr(sorted(table.items())))
        if key not in cache:
            size = table.get("image_size") or data_for(exp).train.image_shape[-1]  # default: the run's
            data = load_dataset(Data(**{k: table[k] for k in DATA_KEYS - {"data_root"} if k in table} | {"image_size": size}),
                                table.get("data_root"))
            if kind == "probe":
                cache[key] = data, lambda ldir: probe_out(ldir, data, table.get("stage"))
            else:
                cache[key] = data, lambda ldir: finetune_out(ldir, data, *finetune_config(exp, table))
        return cache[key]

    def evaluation(ldir, level, label, out, run, trains):
        return Step(key=f"{ldir.relative_to(spec.root)}/{label}", lock=layout.sweep_lock(ldir, label),
                    ready=lambda: layout.is_done(layout.run_dir(ldir)), done=lambda: layout.is_done(out()),
                    run=run, train_dirs=trains if callable(trains) else lambda: [out()] if trains else [], level=level)

    def exp_dir(exp) -> Path:  # created once, under a lock: config.json is written by one worker
        d = spec.root / exp.name()
        if not (d / layout.CONFIG).exists():  # prepare takes the experiment's lock; config.json is written once
            prepare(exp, spec.root, data_for(exp), spec.data_root, ["sweep", str(spec.path)], Runtime(spec.device))
        return d

    steps = []
    for exp in spec.experiments:
        name = exp.name()
        for r in range(1, spec.replicates + 1):
            rdir = layout.replicate_dir(spec.root / name, r)
            levels = range(spec.levels + 1)
            runs = [layout.run_dir(layout.level_dir(spec.root / name, r, L)) for L in levels]
            steps.append(Step(
                key=f"{rdir.relative_to(spec.root)}/lottery", lock=layout.sweep_lock(spec.root / name, rdir.name),
                ready=lambda: True,
                done=lambda runs=runs: all(layout.is_done(run) for run in runs),
                run=lambda exp=exp, r=r: run_replicate(exp, exp_dir(exp), data_for(exp), r, spec.levels, runtime, False),
                train_dirs=lambda runs=runs: runs))
            for level in levels:
                ldir = layout.level_dir(spec.root / name, r, level)
                for reset in spec.retrain:
                    out = layout.run_dir(ldir, reset)
                    steps.append(evaluation(
                        ldir, level, out.name, lambda out=out: out,
                        lambda exp=exp, r=r, level=level, reset=reset: retrain(
                            exp, exp_dir(exp), data_for(exp), r, level, reset, runtime, False), trains=True))
                for i, table in enumerate(spec.probe):
                    steps.append(evaluation(
                        ldir, level, layout.sweep_label("probe", i + 1),
                        lambda exp=exp, t=table, ldir=ldir: downstream(exp, "probe", t)[1](ldir),
                        lambda exp=exp, t=table, r=r, level=level: probe_level(
                            exp_dir(exp), r, level, downstream(exp, "probe", t)[0], Normalize(*data_for(exp).channel_stats()),
                            runtime.device, t.get("stage")), trains=False))
                for i, table in enumerate(spec.finetune):
                    steps.append(evaluation(
                        ldir, level, layout.sweep_label("finetune", i + 1),
                        lambda exp=exp, t=table, ldir=ldir: downstream(exp, "finetune", t)[1](ldir),
                        lambda exp=exp, t=table, r=r, level=level: finetune(
                            exp_dir(exp), r, level, downstream(exp, "finetune", t)[0], *finetune_config(exp, t), runtime, False),
                        trains=True))
                if spec.stability is not None and level in spec.stability.get("level", levels):
                    options = {k: v for k, v in spec.stability.items() if k != "level"}
                    steps.append(evaluation(
                        ldir, level, layout.STABILITY, lambda ldir=ldir: layout.stability_dir(ldir),
                        lambda exp=exp, r=r, level=level, o=options: level_stability(
                            exp, exp_dir(exp), data_for(exp), r, level, runtime, progress=False, **o),
                        trains=lambda ldir=ldir: [layout.stability_copy(ldir, i) for i in (1, 2)
                                                  if layout.stability_copy(ldir, i).exists()]))
    return steps


def _ledger(root: Path, **entry) -> None:
    """One JSON line per event, appended in a single write (O_APPEND: lines never interleave)."""
    root.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": round(time.time(), 3), "pid": os.getpid(), **entry}) + "\n"
    fd = os.open(root / LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def work(spec_path: str | Path, worker: str, poll: float = 0.5) -> int:
    """Run steps until none is left; returns the number of steps this worker finished."""
    spec = load_spec(Path(spec_path))
    steps = plan(spec, Runtime(spec.device))
    finished = 0
    while True:
        pending = [s for s in steps if not s.done()]
        if not pending:
            return finished
        progressed = False
        for step in pending:
            if not step.ready():
                continue
            with layout.file_lock(step.lock, wait=False) as mine:
                if not mine or step.done():    # someone runs it, or finished it meanwhile
                    continue
                before = sum(_progress(d) for d in step.train_dirs())
                _ledger(spec.root, event="start", step=step.key, worker=worker, epochs_before=before)
                step.run()
                epochs = sum(_progress(d) for d in step.train_dirs()) - before
                _ledger(spec.root, event="done", step=step.key, worker=worker, epochs=epochs)
                finished += 1
                progressed = True
        if not progressed:
            time.sleep(poll)  # what is left runs elsewhere, or waits for a level being trained


def run_local(spec_path: Path, workers: int) -> list[int]:
    """`workers` processes on this machine, each running `work`; returns their exit codes."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(str(spec_path), f"local-{i}"), name=f"sweep-{i}")
             for i in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return [p.exitcode for p in procs]


def _worker_main(spec_path: str, worker: str) -> None:
    import sys
    try:
        work(spec_path, worker)
    except UserError as e:
        print(f"sslprune sweep: worker {worker}: error: {e}", file=sys.stderr)
        sys.exit(2)


def submit(spec_path: Path, workers: int, cluster: str, folder: Path, slurm: dict) -> list:
    """`workers` jobs through submitit (cluster 'slurm', or 'local' to run them as local processes);
    returns the jobs. Each job runs `work`; together they finish the sweep."""
    try:
        import submitit
    except ImportError:
        raise UserError("--submit needs submitit: pip install 'sslprune[cluster]'") from None
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = {"timeout_min": slurm.get("time", 60)}
    if cluster == "slurm":
        params |= {k: v for k, v in {"slurm_partition": slurm.get("partition"),
                                     "gpus_per_node": slurm.get("gpus_per_node"),
                                     "cpus_per_task": slurm.get("cpus_per_task")}.items() if v is not None}
    executor.update_parameters(**params)
    with executor.batch():
        jobs = [executor.submit(work, str(spec_path), f"{cluster}-{i}") for i in range(workers)]
    return jobs


def status(spec: Spec) -> dict:
    """Steps done and pending, and the epochs the sweep trained against what it would have
    trained without reuse: each re-training of level L would re-run its own lottery levels 0..L
    (the dense training and rewind point included), as separate experiments do."""
    steps = plan(spec, Runtime(spec.device))
    done = [s for s in steps if s.done()]
    ledger = _read_ledger(spec.root)
    # epochs trained by the sweep: each finished step's epochs, less those it had when first started
    # (a worker killed mid-step is credited through the checkpoint its successor resumed from)
    first = {}
    for e in ledger:
        if e["event"] == "start":
            first.setdefault(e["step"], e["epochs_before"])
    ran = sum(sum(_progress(d) for d in s.train_dirs()) - first[s.key] for s in done if s.key in first)
    per_level = {exp.name(): exp.train.epochs for exp in spec.experiments}
    without = ran + sum(per_level[s.key.split("/")[0]] * (s.level + 1)
                        for s in steps if s.level >= 0 and s.done())
    twice = sorted({e["step"] for e in ledger if e["event"] == "done"
                    and sum(f["event"] == "done" and f["step"] == e["step"] for f in ledger) > 1})
    return {"steps": len(steps), "done": len(done), "pending": [s.key for s in steps if not s.done()],
            "epochs_trained": ran, "epochs_without_reuse": without, "finished_twice": twice}


def _read_ledger(root: Path) -> list[dict]:
    path = root / LEDGER
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
