"""Runs you can watch: one line per finished epoch on stderr when no terminal shows the progress
bars (batch jobs, SLURM logs, `2> log.txt`), and optional experiment tracking (`--track`):
TensorBoard, Weights & Biases or MLflow, each an extra, off by default.

A training run logs its per-epoch record (train/test loss and metric, lr, seconds) under its place
in the experiment, e.g. `replicate_1/level_2/train`, so every level and re-training of a lottery is
one curve of one experiment.
"""
from __future__ import annotations

import sys
from pathlib import Path

from . import layout
from .errors import UserError

class TensorBoard:
    """Event files in the run's folder: `tensorboard --logdir runs/` shows every run of every experiment."""
    module = extra = "tensorboard"

    def __init__(self, run: Path):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(run))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """One W&B run per training run, grouped by experiment."""
    module = extra = "wandb"

    def __init__(self, run: Path):
        import wandb
        self.run = wandb.init(project="sslprune", group=layout.experiment_of(run).name, name=layout.run_name(run),
                              reinit=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """One MLflow run per training run, in an MLflow experiment named after ours."""
    module = extra = "mlflow"

    def __init__(self, run: Path):
        import mlflow
        mlflow.set_experiment(layout.experiment_of(run).name)
        mlflow.start_run(run_name=layout.run_name(run))

    def log(self, metrics: dict[str, float], step: int) -> None:
        import mlflow
        mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        import mlflow
        mlflow.end_run()


BACKENDS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def check(backend: str) -> None:
    """Refuse, before anything runs, an unknown backend or one whose package is missing."""
    if not backend:
        return
    if backend not in BACKENDS:
        raise UserError(f"unknown --track '{backend}'; choose one of: {', '.join(BACKENDS)}")
    cls = BACKENDS[backend]
    try:
        __import__(cls.module)
    except ImportError:
        raise UserError(f"--track {backend} needs {cls.module}: pip install 'sslprune[{cls.extra}]'") from None


def start(backend: str, run: Path):
    """The tracker of one training run, or None (off)."""
    return BACKENDS[backend](Path(run)) if backend else None


def metrics(record: dict) -> dict[str, float]:
    """The numbers of an epoch's record (log.jsonl's line), the epoch itself being the step."""
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "epoch"}


def epoch_line(run: Path, record: dict, epochs: int, metric: str) -> None:
    """`replicate_1/level_2/train epoch 3/15: loss 1.234, test rotation accuracy 0.456 (2.1 s)` on stderr."""
    print(f"{layout.run_name(run)} epoch {record['epoch']}/{epochs}: loss {record['train_loss']:.4f}, "
          f"test {metric} {record['test_acc']:.4f} ({record['train_seconds'] + record['eval_seconds']:.1f} s)",
          file=sys.stderr, flush=True)


def level_line(run: Path, remaining: float, final: dict, metric: str, seconds: float) -> None:
    """`replicate_1/level_2: 64.00% of the weights, test rotation accuracy 0.452, 15 epochs in 31 s` on stderr."""
    print(f"{layout.run_name(run.parent)}: {remaining:.2%} of the weights, test {metric} {final['test_acc']:.4f}, "
          f"{final['epochs']} epochs in {seconds:.0f} s", file=sys.stderr, flush=True)
