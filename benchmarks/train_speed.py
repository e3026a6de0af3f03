"""Training speed of the project's loop against a bare PyTorch loop, the cost of enforcing the
mask, and the data pipeline with RotNet views. Run by hand: `make bench` (or with --steps N).

All numbers are measured in this run, on the same model, batch and data, and printed as ratios.
Random uint8 images stand in for CIFAR-10 (speed does not depend on pixel values).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from sslprune.config import Experiment
from sslprune.data import Dataset, Split
from sslprune.data.augment import Normalize, batch_crop, batch_flip_lr
from sslprune.lottery import build
from sslprune.pruning import SCORES, MaskEnforcer, dense_mask, prunable, prune
from sslprune.tasks.rotation import rotate4
from sslprune.train import train


def fake_cifar(n: int, n_test: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    def split(k):
        return Split(torch.randint(0, 256, (k, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(k) % 10)
    return Dataset("fake-cifar", split(n), split(n_test), [str(i) for i in range(10)])


def bare_loop(model_name: str, data: Dataset, batch: int, steps: int, warmup: int) -> float:
    """The least a training step can be: forward, loss, backward, SGD step. Images/s."""
    torch.manual_seed(0)
    exp = Experiment.from_flat({"model": model_name, "task": "labels"})
    backbone, task = build(exp, 10, seed=0)
    model = nn.Sequential(backbone, task.head)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = (data.train.images[:batch].float() / 255 - 0.5) / 0.25
    y = data.train.labels[:batch]
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def project_loop(model_name: str, data: Dataset, batch: int, steps: int, mask_levels: int) -> float:
    """sslprune.train.train for one epoch of `steps` batches (crop+flip augmentation, mask
    enforcement, per-epoch evaluation on a one-batch test split all included). Images/s of the
    second epoch (the first warms up the allocator)."""
    exp = Experiment.from_flat({"model": model_name, "task": "labels", "optimizer": "sgd", "lr": 0.01,
                                "momentum": 0.9, "batch_size": batch, "epochs": 2, "crop_pad": 2,
                                "flip": True})
    backbone, task = build(exp, 10, seed=0)
    mask = dense_mask(backbone)
    for _ in range(mask_levels):
        mask = prune(SCORES["magnitude"](prunable(backbone)), mask, 0.2)
    with tempfile.TemporaryDirectory() as d:
        res = train(backbone, task, data, exp.train, exp.data, mask, Path(d), seed=0, progress=False)
        log = (Path(d) / "log.jsonl").read_text().splitlines()
    import json
    return steps * batch / json.loads(log[-1])["seconds"]


def mask_cost(model_name: str, batch: int, steps: int) -> tuple[float, float]:
    """Seconds per call of the mask enforcement at 0.8^5 density, and per dense bare step."""
    exp = Experiment.from_flat({"model": model_name, "task": "labels"})
    backbone, task = build(exp, 10, seed=0)
    mask = dense_mask(backbone)
    for _ in range(5):
        mask = prune(SCORES["magnitude"](prunable(backbone)), mask, 0.2)
    enforce = MaskEnforcer(backbone, mask)
    enforce()
    n = 20
    t0 = time.perf_counter()
    for _ in range(n):
        enforce()
    return (time.perf_counter() - t0) / n


def pipeline_rate(data: Dataset, batch: int, steps: int) -> float:
    """uint8 batch -> crop -> flip -> normalise -> 4 rotations. Source images/s."""
    g = torch.Generator().manual_seed(0)
    norm = Normalize(*data.channel_stats())
    t0 = time.perf_counter()
    for i in range(steps):
        idx = torch.randperm(len(data.train), generator=g)[:batch]
        x = batch_flip_lr(batch_crop(data.train.images[idx], 2, g), g)
        inputs, targets = rotate4(norm(x))
    return steps * batch / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet18_cifar"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.steps} timed steps")
    data = fake_cifar(args.batch * args.steps, args.batch)
    for name in args.models:
        bare = bare_loop(name, data, args.batch, args.steps, warmup=2)
        dense = project_loop(name, data, args.batch, args.steps, mask_levels=0)
        pruned = project_loop(name, data, args.batch, args.steps, mask_levels=5)
        enforce = mask_cost(name, args.batch, args.steps)
        step = args.batch / bare
        pipe = pipeline_rate(data, args.batch, 50)
        print(f"\n{name}")
        print(f"  bare PyTorch loop          {bare:9.1f} img/s")
        print(f"  sslprune loop, dense mask  {dense:9.1f} img/s   overhead {bare / dense - 1:+.1%}")
        print(f"  sslprune loop, 0.8^5 mask  {pruned:9.1f} img/s   overhead {bare / pruned - 1:+.1%}")
        print(f"  mask enforcement           {enforce * 1e3:9.2f} ms/step = {enforce / step:.2%} of a dense step")
        print(f"  data pipeline + RotNet x4  {pipe:9.1f} img/s = {pipe / bare:.0f}x training (bare) rate")


if __name__ == "__main__":
    main()
