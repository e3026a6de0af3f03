"""The miniature study: pruning driven by labels, RotNet and NPID (others on request) on digits,
every mask re-trained on labels (winning ticket and re-init), the random-pruning baseline, and
one report. Resumable like the rest.

It is a sweep (sslprune/sweep.py): one spec per objective, written to OUT/specs/, run by local
worker processes that take independent steps side by side (other replicates' lottery chains, other
objectives', the re-trainings of finished levels), each on its own thread: the demo's networks are
too small for two threads to speed up one step, so two at once use two cores. Every step computes
what it would alone (same seeds, same functions, one thread; tested bit for bit against one worker).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tqdm import tqdm

from . import layout
from .config import DEMO_TASKS, PRESETS, Experiment
from .errors import UserError
from .report import write_report
from .runtime import CPU, Runtime
from .tasks import TASKS


def demo_experiment(task: str) -> Experiment:
    """The demo preset for one objective, with what the small dataset needs of it (Task.demo_options)."""
    return Experiment.from_flat({**PRESETS["demo"], "task": task, **TASKS[task].demo_options})


def demo_specs(out: Path, tasks: tuple[str, ...], replicates: int, levels: int, device: str = "cpu") -> list[Path]:
    """OUT/specs/<task>.toml: the demo preset for each objective, its masks re-trained from the
    winning ticket and from a re-initialisation; the random baseline depends on no objective, so it
    runs once, with the first."""
    paths = []
    for task in tasks:
        # every setting written out (the workers are new processes: they read the spec, not this one's presets)
        base = {k: v for section in demo_experiment(task).non_default().values() for k, v in section.items()}
        variants = ["rewind", "reinit", "random"] if task == tasks[0] else ["rewind", "reinit"]
        text = (f'# written by sslprune demo\nroot = "../runs"\nlevels = {levels}\nreplicates = {replicates}\n'
                f'device = "{device}"\n\n[base]\n' + "".join(f"{k} = {json.dumps(v)}\n" for k, v in base.items())
                + f"\n[evaluations]\nretrain = {json.dumps(variants)}\n")
        path = Path(out) / "specs" / f"{task}.toml"
        layout.save_text(path, text)
        paths.append(path)
    return paths


def run_demo(out: Path, replicates: int, levels: int, runtime: Runtime = CPU, progress: bool = True,
             argv: list[str] = ("demo",), tasks: tuple[str, ...] = DEMO_TASKS, workers: int = 0) -> dict:
    """workers: processes side by side (0: one per core), one thread each."""
    from . import workers as pool
    from .sweep import Sweep, load_spec

    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise UserError(f"unknown --tasks {unknown}; choose from: {', '.join(TASKS)}")
    if workers < 0:
        raise UserError(f"--workers must be >= 0 (0 = one per core), got {workers}")
    out = Path(out)
    specs = demo_specs(out, tasks, replicates, levels, runtime.device)
    sweeps = [Sweep(load_spec(p), runtime) for p in specs]        # every experiment checked before any work
    steps = [(sweep, step) for sweep in sweeps for step in sweep.steps()]
    n = workers or os.cpu_count() or 1

    def show(procs):  # one bar for the study, from what is on disk
        with tqdm(total=len(steps), desc="demo", unit="step", disable=None if progress else True) as bar:
            while any(p.is_alive() for p in procs):
                bar.update(sum(sweep.done(s) for sweep, s in steps) - bar.n)
                time.sleep(0.5)
            bar.update(sum(sweep.done(s) for sweep, s in steps) - bar.n)

    # one thread per worker whatever their number: the demo's steps gain nothing from a second thread,
    # and a step's result depends on its thread count (summation order), not on how many run beside it
    codes = pool.run_local(specs, n, threads=1, runtime=runtime, wait=show)
    if any(codes):
        raise UserError(f"a demo worker stopped (exit codes {codes}; its error is above); run the same command "
                        f"again to resume")
    exp_dirs = [sweep.spec.root / exp.name() for sweep in sweeps for exp in sweep.spec.experiments]
    for d in exp_dirs:   # the demo's own command line, beside the sweep's, in each config.json
        from .lottery import record_command
        record_command(d, list(argv))
    return write_report(exp_dirs, out / "report")
