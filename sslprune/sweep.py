"""Sweeps: a declared grid of lottery runs and their evaluations, executed by independent workers
that share one run root (processes on this machine, or SLURM jobs through submitit).

A spec is a TOML file (SPEC_FORMAT below, also in `sslprune sweep --help`).

Steps are plain data (Step); Sweep says where each one's results live and runs it, with the
same per-level functions as the CLI. The lottery step is the sweep's own; an evaluation's steps
are its registry entry's (sslprune/evaluations.py), which this module goes through without
testing names. sslprune/workers.py runs the steps: locks, ledger, processes, SLURM.
"""
from __future__ import annotations

import dataclasses
import itertools
import tomllib
from pathlib import Path

from . import layout
from .config import Experiment, field_names, resolve
from .data import load_dataset
from .errors import UserError
from .evaluations import EVALUATIONS
from .lottery import check_schedule, prepare, run_replicate
from .runtime import Runtime

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
    retrain = ["rewind", "reinit", "random"]   # the re-trainings (retrain --variants)
    level = [0, 2, 4, 6]          # the levels every evaluation runs at (default: every one)

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


@dataclasses.dataclass(frozen=True)
class Spec:
    path: Path
    root: Path
    data_root: str | None
    levels: int
    replicates: int
    device: str
    experiments: tuple[Experiment, ...]
    evaluations: dict[str, tuple] = dataclasses.field(default_factory=dict)  # name: its items, registry order
    evaluated: tuple[int, ...] | None = None  # [evaluations] level: the levels evaluated (None: every one)


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
    tables = dict(raw.get("evaluations", {}))
    levels = int(raw.get("levels", 3))
    evaluated = _evaluated(tables.pop("level", None), levels, path)
    unknown = set(tables) - set(EVALUATIONS)
    if unknown:
        raise UserError(f"{path}: unknown evaluation(s) {sorted(unknown)}; known: {sorted(EVALUATIONS)}")
    here = path.resolve().parent
    evaluations = {name: e.spec(tables[name], f"{path}: evaluations.{name}", here, experiments)
                   for name, e in EVALUATIONS.items() if name in tables}
    for name, items in evaluations.items():  # a table's own levels (stability's): within the spec's
        beyond = sorted({lv for i in items if isinstance(i, dict) for lv in i.get("level", ()) if not 0 <= lv <= levels})
        if beyond:
            raise UserError(f"{path}: evaluations.{name}.level names level(s) {beyond} outside the spec's 0..{levels}; "
                            f"drop them or raise levels")
        dropped = sorted({lv for i in items if isinstance(i, dict) for lv in i.get("level", ())
                          if evaluated and lv not in evaluated})
        if dropped:  # never run: say so rather than skip them
            raise UserError(f"{path}: evaluations.{name}.level names level(s) {dropped} that evaluations.level "
                            f"({list(evaluated)}) leaves out; add them there or drop them")
    data_root = raw.get("data_root")
    return Spec(path=path.resolve(), root=here / raw.get("root", "runs"),
                data_root=str(here / data_root) if data_root else None, levels=int(raw.get("levels", 3)),
                replicates=int(raw.get("replicates", 1)), device=raw.get("device", "cpu"),
                experiments=tuple(experiments), evaluations=evaluations, evaluated=evaluated)


def _evaluated(value, levels: int, path: Path) -> tuple[int, ...] | None:
    """[evaluations] level, checked: the levels every evaluation runs at, or None (all of them)."""
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= levels for v in value):
        raise UserError(f"{path}: evaluations.level must be a non-empty list of levels 0..{levels} (the "
                        f"spec's levels), got {value!r}")
    return tuple(sorted(set(value)))


@dataclasses.dataclass(frozen=True)
class Step:
    """One unit of a sweep, plain data; Sweep.run(step) runs it."""
    kind: str                      # lottery, or an evaluation's name
    experiment: Experiment
    replicate: int
    level: int = -1                # -1: the replicate's lottery chain (levels 0..spec.levels)
    item: int = 0                  # an evaluation's: the index of its item in spec.evaluations[kind]


class Sweep:
    """A spec's steps, where each one's results live, and the one function that runs a step. The
    datasets the steps read are loaded once per worker."""

    def __init__(self, spec: Spec, runtime: Runtime | None = None, worker: str = "local"):
        self.spec, self.runtime, self.worker, self._cache = spec, runtime or Runtime(spec.device), worker, {}

    def steps(self) -> list[Step]:
        """Every step, lottery chains first within each replicate."""
        out = []
        for exp in self.spec.experiments:
            for r in range(1, self.spec.replicates + 1):
                out.append(Step("lottery", exp, r))
                for level in self.spec.evaluated or range(self.spec.levels + 1):
                    out += [Step(name, exp, r, level, i) for name, items in self.spec.evaluations.items()
                            for i, item in enumerate(items) if EVALUATIONS[name].at(item, exp, level)]
        return out

    # what an evaluation's entry reads of a step
    def item(self, step: Step):
        """The step's item of its evaluation's spec (a re-training's variant, a probe's table, ...)."""
        return self.spec.evaluations[step.kind][step.item]

    def level_dir(self, step: Step) -> Path:
        return layout.level_dir(self.spec.root / step.experiment.name(), step.replicate, step.level)

    # where a step's results live
    def key(self, step: Step) -> str:
        """e.g. 'labels_convnet_digits_<hash>/replicate_1/level_2/retrain_reinit' (the ledger's)."""
        if step.kind == "lottery":
            return f"{layout.replicate_dir(self.spec.root / step.experiment.name(), step.replicate).relative_to(self.spec.root)}/lottery"
        return f"{self.level_dir(step).relative_to(self.spec.root)}/{EVALUATIONS[step.kind].label(self, step)}"

    def lock(self, step: Step) -> Path:
        if step.kind == "lottery":
            exp_dir = self.spec.root / step.experiment.name()
            return layout.sweep_lock(exp_dir, layout.replicate_dir(exp_dir, step.replicate).name)
        return layout.sweep_lock(self.level_dir(step), EVALUATIONS[step.kind].label(self, step))

    def train_dirs(self, step: Step) -> list[Path]:
        """The training runs a step makes (its epochs are counted there)."""
        if step.kind == "lottery":
            return [layout.run_dir(layout.level_dir(self.spec.root / step.experiment.name(), step.replicate, L))
                    for L in range(self.spec.levels + 1)]
        return EVALUATIONS[step.kind].train_dirs(self, step)

    def ready(self, step: Step) -> bool:
        """Its inputs exist: an evaluation waits until its level is trained."""
        return step.kind == "lottery" or layout.is_done(layout.run_dir(self.level_dir(step)))

    def done(self, step: Step) -> bool:
        return all(layout.is_done(d) for d in self.train_dirs(step)) if step.kind == "lottery" else \
            layout.is_done(EVALUATIONS[step.kind].out(self, step))

    def claim(self, steps: list[Step], most: int):
        """For an evaluation that runs several steps at once (retrain --stack): a context taking,
        without waiting, the locks of up to `most` of `steps` that no worker holds and that are not
        done; it yields the steps taken, held (and in the ledger) as the worker's own until the
        block ends."""
        from .workers import claim
        return claim(self, steps, most, self.worker)

    def run(self, step: Step) -> None:
        """Run one step, as the CLI's command for it would."""
        if step.kind == "lottery":
            exp = step.experiment
            run_replicate(exp, self.exp_dir(exp), self.dataset(exp), step.replicate, self.spec.levels,
                          self.runtime, False)
        else:
            EVALUATIONS[step.kind].run(self, step)

    # the data and folders steps read, once per worker
    def cached(self, key, make):
        """make() the first time `key` is asked for in this worker, then the same object."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def dataset(self, exp: Experiment):
        """The experiment's own dataset."""
        return self.cached(repr(exp.data), lambda: load_dataset(exp.data, self.spec.data_root))

    def exp_dir(self, exp: Experiment) -> Path:
        """Created once (prepare takes the experiment's lock: config.json has one writer)."""
        d = self.spec.root / exp.name()
        if not (d / layout.CONFIG).exists():
            prepare(exp, self.spec.root, self.dataset(exp), self.spec.data_root, ["sweep", str(self.spec.path)],
                    self.runtime)
        return d
