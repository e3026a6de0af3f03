"""Where the compute goes: the project's training loop against a bare PyTorch loop, the cost of
enforcing the mask, the data pipeline with RotNet views, achieved GFLOP/s against the machine's
measured fp32 matrix-multiply peak, the runtime choices (memory format, bf16, torch.compile), the
global prune of a ResNet-50, and peak memory. Run by hand: `make bench` (flags: --help).

Every number is measured in this run, on the same model, batch and data, and reported as a ratio.
Run-to-run noise on a shared 2-core VM is about +-10%, so loops are measured in interleaved rounds
(bare, ours dense, ours pruned), each round's ratio taken, and the median ratio reported. Our loop's
time is its training part: per-epoch evaluation is logged apart (eval_seconds) and reported apart.
Random uint8 images stand in for CIFAR-10 (speed does not depend on pixel values).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sslprune.config import Experiment
from sslprune.data import Dataset, Split
from sslprune.data.augment import Normalize, batch_crop, batch_flip_lr
from sslprune.lottery import build
from sslprune.models import build_model
from sslprune.pruning import SCORES, MaskEnforcer, dense_mask, prunable, prune, prune_iteratively
from sslprune.runtime import Runtime
from sslprune.tasks.rotation import rotate4
from sslprune.train import train


def fake_cifar(n: int, n_test: int) -> Dataset:
    g = torch.Generator().manual_seed(0)

    def split(k):
        return Split(torch.randint(0, 256, (k, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(k) % 10)
    return Dataset("fake-cifar", split(n), split(n_test), [str(i) for i in range(10)])


def _model(model_name: str, data: Dataset, memory_format) -> nn.Module:
    backbone, task = build(Experiment.from_flat({"model": model_name, "task": "labels"}), data, seed=0)
    return nn.Sequential(backbone, task.head).train().to(memory_format=memory_format)


def bare_loop(model_name: str, data: Dataset, batch: int, steps: int, windows: int, rt: Runtime) -> float:
    """The least a training step can be: forward, loss, backward, SGD step on a ready batch."""
    model = _model(model_name, data, rt.memory_format)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if rt.compile:
        model.compile()
    x = ((data.train.images[:batch].float() / 255 - 0.5) / 0.25).contiguous(memory_format=rt.memory_format)
    y = data.train.labels[:batch]
    best = float("inf")
    for w in range(windows + 1):  # window 0 warms up (and compiles)
        t0 = time.perf_counter()
        for _ in range(steps):
            with rt.autocast():
                loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if w:
            best = min(best, time.perf_counter() - t0)
    return steps * batch / best


def project_loop(model_name: str, data: Dataset, batch: int, windows: int, mask_levels: int,
                 rt: Runtime) -> tuple[float, float, float]:
    """sslprune.train.train (crop+flip augmentation, lr schedule, metrics, mask enforcement):
    training images/s of the best epoch after the first, evaluation seconds per epoch, and the
    first epoch's seconds (with torch.compile: compile time included)."""
    exp = Experiment.from_flat({"model": model_name, "task": "labels", "optimizer": "sgd", "lr": 0.01,
                                "momentum": 0.9, "batch_size": batch, "epochs": windows + 1,
                                "crop_pad": 2, "flip": True})
    backbone, task = build(exp, data, seed=0)
    with tempfile.TemporaryDirectory() as d:
        train(backbone, task, data, exp.train, exp.data, prune_iteratively(backbone, mask_levels, 0.2), Path(d),
              seed=0, runtime=rt, progress=False)
        log = [json.loads(line) for line in (Path(d) / "log.jsonl").read_text().splitlines()]
    best = min(h["train_seconds"] for h in log[1:])
    return len(data.train) // batch * batch / best, min(h["eval_seconds"] for h in log[1:]), log[0]["train_seconds"]


def step_flops(model_name: str, data: Dataset, batch: int) -> float:
    """Nominal FLOPs of one training step (forward + backward), counted by torch's FlopCounterMode
    as direct convolutions. oneDNN runs many 3x3 convs with Winograd, which does fewer arithmetic
    operations, so achieved nominal GFLOP/s can exceed the measured matrix-multiply peak."""
    model = _model(model_name, data, torch.contiguous_format)
    x = (data.train.images[:batch].float() / 255)
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(x), data.train.labels[:batch]).backward()
    return counter.get_total_flops()


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """Measured fp32 matrix-multiply FLOP/s (the best of `reps`): the machine's practical peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def mask_cost(model_name: str, data: Dataset, calls: int = 20) -> float:
    """Seconds per call of the mask enforcement at 0.8^5 density (every layer pruned)."""
    backbone, _ = build(Experiment.from_flat({"model": model_name, "task": "labels"}), data, seed=0)
    backbone.to(memory_format=torch.channels_last)
    enforce = MaskEnforcer(backbone, prune_iteratively(backbone, 5, 0.2))
    enforce()
    t0 = time.perf_counter()
    for _ in range(calls):
        enforce()
    return (time.perf_counter() - t0) / calls


def pipeline_rate(data: Dataset, batch: int, steps: int) -> float:
    """uint8 batch -> crop -> flip -> normalise -> 4 rotations. Source images/s."""
    g = torch.Generator().manual_seed(0)
    norm = Normalize(*data.channel_stats(), memory_format=torch.channels_last)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randperm(len(data.train), generator=g)[:batch]
        rotate4(norm(batch_flip_lr(batch_crop(data.train.images[idx], 2, g), g)))
    return steps * batch / (time.perf_counter() - t0)


def global_prune_seconds(model_name: str = "resnet50", reps: int = 3) -> tuple[float, int]:
    """One global magnitude-pruning step over every prunable weight (20% of the survivors of a
    level-1 mask): the best of `reps`, and the number of weights scored."""
    torch.manual_seed(0)
    backbone = build_model(model_name)
    scores = SCORES["magnitude"](prunable(backbone))
    mask = prune(scores, dense_mask(backbone), 0.2)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        prune(scores, mask, 0.2)
        best = min(best, time.perf_counter() - t0)
    return best, sum(m.numel() for m in mask.values())


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["convnet", "resnet20", "resnet18_cifar", "vgg19"])
    p.add_argument("--batches", type=int, nargs="+", default=[128, 256])
    p.add_argument("--steps", type=int, default=8, help="steps per timing window (= per epoch)")
    p.add_argument("--windows", type=int, default=1, help="timed windows per loop and round (best kept)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; median ratio reported")
    p.add_argument("--runtime", action="store_true", help="also compare channels_last, bf16 and "
                   "torch.compile against the default (slow: bf16 on a CPU without bf16 units is ~50x)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    rt = Runtime(args.device).resolved()
    peak = matmul_peak()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"runtime {rt.fingerprint()}, {args.rounds} rounds of {args.windows} window(s) of {args.steps} steps")
    print(f"fp32 matrix-multiply peak (2048^3, measured): {peak / 1e9:.1f} GFLOP/s")
    seconds, n = global_prune_seconds()
    print(f"global prune step, resnet50 ({n / 1e6:.1f}M prunable weights): {seconds:.3f} s")
    for batch in args.batches:
        data = fake_cifar(batch * args.steps, batch)
        for name in args.models:
            rounds = []
            for _ in range(args.rounds):
                bare_r = bare_loop(name, data, batch, args.steps, args.windows, rt)
                dense_r, eval_s, _ = project_loop(name, data, batch, args.windows, 0, rt)
                pruned_r, _, _ = project_loop(name, data, batch, args.windows, 5, rt)
                rounds.append((bare_r, dense_r, pruned_r))
            bare, dense, pruned = (statistics.median(r[i] for r in rounds) for i in range(3))
            over_dense = statistics.median(b / d - 1 for b, d, _ in rounds)
            over_pruned = statistics.median(b / q - 1 for b, _, q in rounds)
            enforce = mask_cost(name, data)
            step = batch / dense
            pipe = pipeline_rate(data, batch, 50)
            gflops = step_flops(name, data, batch) / step
            print(f"\n{name}, batch {batch}")
            print(f"  bare PyTorch loop          {bare:9.1f} img/s   (rounds: {', '.join(f'{r[0]:.1f}' for r in rounds)})")
            print(f"  sslprune loop, dense mask  {dense:9.1f} img/s   time overhead {over_dense:+.1%} (median of paired ratios)")
            print(f"  sslprune loop, 0.8^5 mask  {pruned:9.1f} img/s   time overhead {over_pruned:+.1%}")
            print(f"  mask enforcement           {enforce * 1e3:9.2f} ms/step = {enforce / step:.2%} of a dense step")
            print(f"  per-epoch evaluation       {eval_s:9.2f} s ({batch} test images), logged apart")
            print(f"  data pipeline + RotNet x4  {pipe:9.1f} img/s = {pipe / dense:.0f}x the training rate")
            print(f"  achieved (nominal FLOPs)   {gflops / 1e9:9.1f} GFLOP/s = {gflops / peak:.0%} of the matmul peak")
            if args.runtime:
                variants = {"contiguous (NCHW)": Runtime(args.device, channels_last=False),
                            "bf16 autocast": Runtime(args.device, precision="bf16"),
                            "torch.compile": Runtime(args.device, compile=True)}
                for label, v in variants.items():
                    r, _, first = project_loop(name, data, batch, args.windows, 0, v)
                    print(f"  {label:<26} {r:9.1f} img/s = {r / dense:.2f}x the default; first epoch {first:.1f} s")
    print(f"\npeak resident memory of this process: {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
