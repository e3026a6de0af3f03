"""Tiny data and configs: every test runs on CPU in seconds."""
from __future__ import annotations

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
    values.update(overrides)
    return Experiment.from_flat(values)


@pytest.fixture
def data() -> Dataset:
    return tiny_dataset()


@pytest.fixture(autouse=True)
def _hermetic(tmp_path, monkeypatch):
    monkeypatch.setenv("SSLPRUNE_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(2)
