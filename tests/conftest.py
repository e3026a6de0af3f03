"""Tiny data and configs: every test runs on CPU in seconds."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sslprune.config import Experiment
from sslprune.data import Dataset, Split


def tiny_dataset(n_train=96, n_test=48, size=8, classes=3, seed=0) -> Dataset:
    """Classes differ by which quadrant is bright, so a convnet learns them in a few epochs."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        y = torch.arange(n) % classes
        x = torch.randint(0, 60, (n, 3, size, size), generator=g)
        h = size // 2
        for c in range(classes):
            r, col = divmod(c, 2)
            x[y == c, :, r * h:(r + 1) * h, col * h:(col + 1) * h] += 150
        return Split(x.clamp(0, 255).to(torch.uint8), y)

    return Dataset("tiny", split(n_train), split(n_test), [f"c{i}" for i in range(classes)])


def tiny_experiment(task="labels", **overrides) -> Experiment:
    values = dict(dataset="digits", model="convnet", task=task, optimizer="adam", lr=3e-3,
                  weight_decay=1e-4, batch_size=32, epochs=2, crop_pad=1, flip=True, rewind="1it")
    if task == "npid":
        values["knn"] = 20  # the default 200 neighbours exceed the tiny data's bank of 96 rows
    values.update(overrides)
    return Experiment.from_flat(values)


def digits_lottery(root, levels: int = 0, *extra: str):
    """A one-epoch labels lottery on the embedded digits through the CLI; returns its experiment folder."""
    from sslprune.cli import main
    assert main(["lottery", "--dataset", "digits", "--model", "convnet", "--task", "labels", "--optimizer", "adam",
                 "--lr", "2e-3", "--batch-size", "64", "--epochs", "1", "--levels", str(levels), "--quiet",
                 "--root", str(root), *extra]) == 0
    return next(iter(sorted(Path(root).iterdir())))


def killed_at_evaluation(monkeypatch, n: int, run) -> None:
    """Run `run()` with a KeyboardInterrupt raised at the n-th per-epoch evaluation (a kill), then
    restore evaluation. evaluate() runs after each epoch, before that epoch's checkpoint."""
    from sslprune import stacked as stacked_mod
    from sslprune import train as train_mod

    real, calls = train_mod.evaluate, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    for mod in (train_mod, stacked_mod):   # a stack evaluates each of its networks in turn
        monkeypatch.setattr(mod, "evaluate", dying)
    with pytest.raises(KeyboardInterrupt):
        run()
    for mod in (train_mod, stacked_mod):
        monkeypatch.setattr(mod, "evaluate", real)


@pytest.fixture
def data() -> Dataset:
    return tiny_dataset()


@pytest.fixture(autouse=True)
def _hermetic(tmp_path, monkeypatch):
    monkeypatch.setenv("SSLPRUNE_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(2)
