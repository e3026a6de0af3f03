"""Training speed of the project's loop against a bare PyTorch loop, the cost of enforcing the
mask, and the data pipeline with RotNet views. Run by hand: `make bench` (or with --steps N).

All numbers are measured in this run, on the same model, batch and data, and printed as ratios.
Run-to-run noise on a shared 2-core VM is about +-10%, so the loops are measured in interleaved
rounds (bare, ours dense, ours pruned), each round's ratio taken, and the median ratio reported. Our loop's time is its training part: per-epoch evaluation
is logged separately (eval_seconds) and reported on its own line.
Random uint8 images stand in for CIFAR-10 (speed does not depend on pixel values).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from sslprune.config import Experiment
from sslprune.data import Dataset, Split
from sslprune.data.augment import Normalize, batch_crop, batch_flip_lr
from sslprune.lottery import build
from sslprune.pruning import MaskEnforcer, prune_iteratively
from sslprune.tasks.rotation import rotate4
from sslprune.train import train


def fake_cifar(n: int, n_test: int) -> Dataset:
    g = torch.Generator().manual_seed(0)

    def split(k):
        return Split(torch.randint(0, 256, (k, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(k) % 10)
    return Dataset("fake-cifar", split(n), split(n_test), [str(i) for i in range(10)])


def bare_loop(model_name: str, data: Dataset, batch: int, steps: int, windows: int) -> float:
    """The least a training step can be: forward, loss, backward, SGD step on a ready batch."""
    exp = Experiment.from_flat({"model": model_name, "task": "labels"})
    backbone, task = build(exp, 10, seed=0)
    model = nn.Sequential(backbone, task.head).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = (data.train.images[:batch].float() / 255 - 0.5) / 0.25
    y = data.train.labels[:batch]
    best = float("inf")
    for w in range(windows + 1):  # window 0 warms up
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if w:
            best = min(best, time.perf_counter() - t0)
    return steps * batch / best


def project_loop(model_name: str, data: Dataset, batch: int, windows: int, mask_levels: int) -> tuple[float, float]:
    """sslprune.train.train (crop+flip augmentation, lr schedule, metrics, mask enforcement):
    training images/s of the best epoch after the first, and evaluation seconds per epoch."""
    exp = Experiment.from_flat({"model": model_name, "task": "labels", "optimizer": "sgd", "lr": 0.01,
                                "momentum": 0.9, "batch_size": batch, "epochs": windows + 1,
                                "crop_pad": 2, "flip": True})
    backbone, task = build(exp, 10, seed=0)
    with tempfile.TemporaryDirectory() as d:
        train(backbone, task, data, exp.train, exp.data, prune_iteratively(backbone, mask_levels, 0.2), Path(d),
              seed=0, progress=False)
        log = [json.loads(line) for line in (Path(d) / "log.jsonl").read_text().splitlines()][1:]
    best = min(h["train_seconds"] for h in log)
    return len(data.train) // batch * batch / best, min(h["eval_seconds"] for h in log)


def mask_cost(model_name: str, calls: int = 20) -> float:
    """Seconds per call of the mask enforcement at 0.8^5 density (every layer pruned)."""
    backbone, _ = build(Experiment.from_flat({"model": model_name, "task": "labels"}), 10, seed=0)
    enforce = MaskEnforcer(backbone, prune_iteratively(backbone, 5, 0.2))
    enforce()
    t0 = time.perf_counter()
    for _ in range(calls):
        enforce()
    return (time.perf_counter() - t0) / calls


def pipeline_rate(data: Dataset, batch: int, steps: int) -> float:
    """uint8 batch -> crop -> flip -> normalise -> 4 rotations. Source images/s."""
    g = torch.Generator().manual_seed(0)
    norm = Normalize(*data.channel_stats())
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randperm(len(data.train), generator=g)[:batch]
        rotate4(norm(batch_flip_lr(batch_crop(data.train.images[idx], 2, g), g)))
    return steps * batch / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet18_cifar"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=8, help="steps per timing window (= per epoch)")
    p.add_argument("--windows", type=int, default=1, help="timed windows per loop and round (best kept)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; median ratio reported")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.rounds} rounds of {args.windows} window(s) of {args.steps} steps")
    data = fake_cifar(args.batch * args.steps, args.batch)
    for name in args.models:
        rounds = []
        for _ in range(args.rounds):
            bare_r = bare_loop(name, data, args.batch, args.steps, args.windows)
            dense_r, eval_s = project_loop(name, data, args.batch, args.windows, mask_levels=0)
            pruned_r, _ = project_loop(name, data, args.batch, args.windows, mask_levels=5)
            rounds.append((bare_r, dense_r, pruned_r))
        bare, dense, pruned = (statistics.median(r[i] for r in rounds) for i in range(3))
        over_dense = statistics.median(b / d - 1 for b, d, _ in rounds)
        over_pruned = statistics.median(b / q - 1 for b, _, q in rounds)
        enforce = mask_cost(name)
        step = args.batch / bare
        pipe = pipeline_rate(data, args.batch, 50)
        print(f"\n{name}")
        print(f"  bare PyTorch loop          {bare:9.1f} img/s   (rounds: {', '.join(f'{r[0]:.1f}' for r in rounds)})")
        print(f"  sslprune loop, dense mask  {dense:9.1f} img/s   time overhead {over_dense:+.1%} (median of paired ratios)")
        print(f"  sslprune loop, 0.8^5 mask  {pruned:9.1f} img/s   time overhead {over_pruned:+.1%}")
        print(f"  mask enforcement           {enforce * 1e3:9.2f} ms/step = {enforce / step:.2%} of a dense step")
        print(f"  per-epoch evaluation       {eval_s:9.2f} s ({args.batch} test images), logged apart")
        print(f"  data pipeline + RotNet x4  {pipe:9.1f} img/s = {pipe / bare:.0f}x the training rate")


if __name__ == "__main__":
    main()
