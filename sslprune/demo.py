"""The miniature study: pruning driven by labels, RotNet and NPID (others on request) on digits,
every mask re-trained on labels (winning ticket and re-init), the random-pruning baseline, and
one report. Resumable like the rest."""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from .config import DEMO_TASKS, PRESETS, Experiment
from .data import load_dataset
from .errors import UserError
from .lottery import prepare, run_replicate
from .report import write_report
from .retrain import retrain
from .runtime import CPU, Runtime
from .tasks import TASKS

def demo_experiment(task: str) -> Experiment:
    """The demo preset for one objective, with what the small dataset needs of it (Task.demo_options)."""
    return Experiment.from_flat({**PRESETS["demo"], "task": task, **TASKS[task].demo_options})


def run_demo(out: Path, replicates: int, levels: int, runtime: Runtime = CPU, progress: bool = True,
             argv: list[str] = ("demo",), tasks: tuple[str, ...] = DEMO_TASKS) -> dict:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise UserError(f"unknown --tasks {unknown}; choose from: {', '.join(TASKS)}")
    out = Path(out)
    data = load_dataset(demo_experiment("labels").data)
    exp_dirs = {task: prepare(demo_experiment(task), out / "runs", data, None, list(argv)) for task in tasks}
    steps = [(task, r, level) for task in exp_dirs for r in range(1, replicates + 1) for level in range(levels + 1)]
    # One bar for the study (the runs are seconds each); finished steps are read back, not redone.
    for task, r, level in tqdm(steps, desc="demo", unit="level", disable=None if progress else True):
        exp = demo_experiment(task)
        run_replicate(exp, exp_dirs[task], data, r, level, runtime, progress=False)
        # The random baseline depends on no objective: run it once, beside the first run.
        for variant in ("rewind", "reinit", "random") if task == tasks[0] else ("rewind", "reinit"):
            retrain(exp, exp_dirs[task], data, r, level, variant, runtime, progress=False)
    return write_report(list(exp_dirs.values()), out / "report")
