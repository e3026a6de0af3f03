"""Sweeps: a declared grid of lottery runs and their evaluations, executed by independent workers
that share one run root (processes on this machine, or SLURM jobs through submitit).

A spec is a TOML file (SPEC_FORMAT below, also in `sslprune sweep --help`).

Steps are plain data (Step); Sweep says where each one's results live and runs it, with the
same per-level functions as the CLI. sslprune/workers.py runs them: locks, ledger, processes, SLURM.
"""
from __future__ import annotations

import dataclasses
import itertools
import tomllib
from pathlib import Path

from . import layout
from .config import Data, Experiment, Train, field_names, resolve
from .data import load_dataset
from .data.augment import Normalize
from .errors import UserError
from .lottery import check_schedule, prepare, run_replicate
from .probe import probe_level, probe_out
from .retrain import RESETS, retrain
from .runtime import Runtime
from .stability import level_stability
from .transfer import finetune, finetune_config, finetune_out

SPEC_FORMAT = """\
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
"""

SPEC_KEYS = {"root", "data_root", "levels", "replicates", "device", "base", "grid", "evaluations"}
EVALUATIONS = {"retrain", "probe", "finetune", "stability"}
STABILITY_KEYS = {"level": list, "points": int, "bn": str, "bn_batches": int}
DATA_KEYS = {"dataset", "data_root", "image_size", "train_per_class", "test_per_class"}


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
        check_schedule(exp, int(raw.get("levels", 3)))
        experiments.append(exp)
    evaluations = raw.get("evaluations", {})
    unknown = set(evaluations) - EVALUATIONS
    if unknown:
        raise UserError(f"{path}: unknown evaluation(s) {sorted(unknown)}; known: {sorted(EVALUATIONS)}")
    retrain = tuple(evaluations.get("retrain", ()))
    bad = [r for r in retrain if r not in RESETS]
    if bad:
        raise UserError(f"{path}: unknown retrain reset(s) {bad}; choose from {', '.join(RESETS)}")
    if "random_adjusted" in retrain and any(e.prune.granularity == "channel" for e in experiments):
        raise UserError(f"{path}: random_adjusted prunes naturally-zero single weights; a channel run's random "
                        f"baseline is 'random' (random channels): drop random_adjusted")
    here = path.resolve().parent
    probe = tuple(_downstream(path, here, "probe", t, {"stage"}) for t in evaluations.get("probe", ()))
    finetune = tuple(_downstream(path, here, "finetune", t, _FINETUNE_KEYS) for t in evaluations.get("finetune", ()))
    for t in finetune:  # the overrides make a valid training configuration for every experiment
        for exp in experiments:
            finetune_config(exp, t)
    stability = _stability(path, evaluations.get("stability"), experiments)
    data_root = raw.get("data_root")
    return Spec(path=path.resolve(), root=here / raw.get("root", "runs"),
                data_root=str(here / data_root) if data_root else None, levels=int(raw.get("levels", 3)),
                replicates=int(raw.get("replicates", 1)), device=raw.get("device", "cpu"),
                experiments=tuple(experiments), retrain=retrain, probe=probe, finetune=finetune, stability=stability)


def _stability(path: Path, table, experiments: list[Experiment]) -> dict | None:
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
    from .stability import BN_MODES, check_options
    if table.get("bn", "recompute") not in BN_MODES:
        raise UserError(f"{path}: evaluations.stability.bn must be one of {', '.join(BN_MODES)}, got {table['bn']!r}")
    try:
        for exp in experiments:
            check_options(table.get("points", 11), table.get("bn", "recompute"), table.get("bn_batches", 20), exp)
    except UserError as e:
        raise UserError(f"{path}: evaluations.stability: {e}") from None
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


@dataclasses.dataclass(frozen=True)
class Step:
    """One unit of a sweep, plain data; Sweep.run(step) runs it."""
    kind: str                      # lottery | retrain | probe | finetune | stability
    experiment: Experiment
    replicate: int
    level: int = -1                # -1: the replicate's lottery chain (levels 0..spec.levels)
    evaluation: str | int = ""     # retrain: the reset; probe, finetune: the table's index in the spec


class Sweep:
    """A spec's steps, where each one's results live, and the one function that runs a step. The
    datasets the steps read are loaded once per worker."""

    def __init__(self, spec: Spec, runtime: Runtime | None = None):
        self.spec, self.runtime, self._data = spec, runtime or Runtime(spec.device), {}

    def steps(self) -> list[Step]:
        """Every step, lottery chains first within each replicate."""
        out = []
        for exp in self.spec.experiments:
            for r in range(1, self.spec.replicates + 1):
                out.append(Step("lottery", exp, r))
                for level in range(self.spec.levels + 1):
                    out += [Step("retrain", exp, r, level, reset) for reset in self.spec.retrain]
                    out += [Step("probe", exp, r, level, i) for i in range(len(self.spec.probe))]
                    out += [Step("finetune", exp, r, level, i) for i in range(len(self.spec.finetune))]
                    if self.spec.stability is not None and level in self.spec.stability.get("level", [level]):
                        out.append(Step("stability", exp, r, level))
        return out

    # where a step's results live
    def _level(self, step: Step) -> Path:
        return layout.level_dir(self.spec.root / step.experiment.name(), step.replicate, step.level)

    def _label(self, step: Step) -> str:
        """The step's name in its level (ledger key and claim lock)."""
        if step.kind == "retrain":
            return layout.run_dir(self._level(step), step.evaluation).name
        if step.kind in ("probe", "finetune"):
            return layout.sweep_label(step.kind, step.evaluation + 1)
        return layout.STABILITY

    def key(self, step: Step) -> str:
        """e.g. 'labels_convnet_digits_<hash>/replicate_1/level_2/retrain_reinit' (the ledger's)."""
        if step.kind == "lottery":
            return f"{layout.replicate_dir(self.spec.root / step.experiment.name(), step.replicate).relative_to(self.spec.root)}/lottery"
        return f"{self._level(step).relative_to(self.spec.root)}/{self._label(step)}"

    def lock(self, step: Step) -> Path:
        if step.kind == "lottery":
            exp_dir = self.spec.root / step.experiment.name()
            return layout.sweep_lock(exp_dir, layout.replicate_dir(exp_dir, step.replicate).name)
        return layout.sweep_lock(self._level(step), self._label(step))

    def out(self, step: Step) -> Path:
        """The folder whose done.json marks an evaluation done."""
        ldir = self._level(step)
        if step.kind == "retrain":
            return layout.run_dir(ldir, step.evaluation)
        if step.kind == "probe":
            data, table = self._downstream(step)
            return probe_out(ldir, data, table.get("stage"))
        if step.kind == "finetune":
            data, table = self._downstream(step)
            return finetune_out(ldir, data, *finetune_config(step.experiment, table))
        return layout.stability_dir(ldir)

    def train_dirs(self, step: Step) -> list[Path]:
        """The training runs a step makes (its epochs are counted there)."""
        if step.kind == "lottery":
            return [layout.run_dir(layout.level_dir(self.spec.root / step.experiment.name(), step.replicate, L))
                    for L in range(self.spec.levels + 1)]
        if step.kind in ("retrain", "finetune"):
            return [self.out(step)]
        if step.kind == "stability":
            return [c for c in (layout.stability_copy(self._level(step), i) for i in (1, 2)) if c.exists()]
        return []

    def ready(self, step: Step) -> bool:
        """Its inputs exist: an evaluation waits until its level is trained."""
        return step.kind == "lottery" or layout.is_done(layout.run_dir(self._level(step)))

    def done(self, step: Step) -> bool:
        return all(layout.is_done(d) for d in self.train_dirs(step)) if step.kind == "lottery" else \
            layout.is_done(self.out(step))

    def run(self, step: Step) -> None:
        """Run one step, as the CLI's command for it would."""
        exp, r, level, rt = step.experiment, step.replicate, step.level, self.runtime
        exp_dir, data = self._exp_dir(exp), self._dataset(exp)
        if step.kind == "lottery":
            run_replicate(exp, exp_dir, data, r, self.spec.levels, rt, False)
        elif step.kind == "retrain":
            retrain(exp, exp_dir, data, r, level, step.evaluation, rt, False)
        elif step.kind == "probe":
            target, table = self._downstream(step)
            probe_level(exp_dir, r, level, target, Normalize(*data.channel_stats()), rt.device, table.get("stage"))
        elif step.kind == "finetune":
            target, table = self._downstream(step)
            finetune(exp_dir, r, level, target, *finetune_config(exp, table), rt, False)
        else:
            options = {k: v for k, v in self.spec.stability.items() if k != "level"}
            level_stability(exp, exp_dir, data, r, level, rt, progress=False, **options)

    # the data steps read, once per worker
    def _dataset(self, exp: Experiment):
        key = repr(exp.data)
        if key not in self._data:
            self._data[key] = load_dataset(exp.data, self.spec.data_root)
        return self._data[key]

    def _downstream(self, step: Step) -> tuple:
        """(data, table) of a probe or fine-tune step's [[evaluations.*]] table."""
        table = (self.spec.probe if step.kind == "probe" else self.spec.finetune)[step.evaluation]
        key = (step.kind, step.experiment.name(), step.evaluation)
        if key not in self._data:
            size = table.get("image_size") or self._dataset(step.experiment).train.image_shape[-1]  # default: the run's
            self._data[key] = load_dataset(Data(**{k: table[k] for k in DATA_KEYS - {"data_root"} if k in table}
                                                | {"image_size": size}), table.get("data_root"))
        return self._data[key], table

    def _exp_dir(self, exp: Experiment) -> Path:
        """Created once (prepare takes the experiment's lock: config.json has one writer)."""
        d = self.spec.root / exp.name()
        if not (d / layout.CONFIG).exists():
            prepare(exp, self.spec.root, self._dataset(exp), self.spec.data_root, ["sweep", str(self.spec.path)],
                    Runtime(self.spec.device))
        return d
