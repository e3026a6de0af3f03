"""The miniature study: labels- and RotNet-driven pruning on digits, every mask re-trained on labels
(winning ticket and re-init), the random-pruning baseline, and the report. Resumable like the rest."""
from __future__ import annotations

from pathlib import Path

from .config import PRESETS, Experiment
from .data import load_dataset
from .lottery import prepare, run_replicate
from .report import write_report
from .retrain import retrain


def demo_experiment(task: str) -> Experiment:
    return Experiment.from_flat({**PRESETS["demo"], "task": task})


def run_demo(out: Path, replicates: int, levels: int, device: str = "cpu", progress: bool = True,
             argv: list[str] = ("demo",)) -> dict:
    out = Path(out)
    exp_dirs = []
    for task in ("labels", "rotation"):
        exp = demo_experiment(task)
        data = load_dataset(exp.data)
        exp_dir = prepare(exp, out / "runs", data, None, list(argv))
        for r in range(1, replicates + 1):
            run_replicate(exp, exp_dir, data, r, levels, device, progress)
            # The random baseline depends on no objective: run it once, beside the labels run.
            resets = ("rewind", "reinit", "random") if task == "labels" else ("rewind", "reinit")
            for level in range(levels + 1):
                for reset in resets:
                    retrain(exp, exp_dir, data, r, level, reset, device, progress)
        exp_dirs.append(exp_dir)
    return write_report(exp_dirs, out / "report")
