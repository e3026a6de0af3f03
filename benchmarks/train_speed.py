"""Where the compute goes: the project's training loop against a bare PyTorch loop, the cost of
enforcing the mask, the data pipeline with RotNet views, achieved GFLOP/s against the machine's
measured fp32 matrix-multiply peak, the runtime choices (memory format, bf16, torch.compile), the
global prune of a ResNet-50, and peak memory. Run by hand: `make bench` (flags: --help).

Every number is measured in this run, on the same model, batch and data, and reported as a ratio.
Run-to-run noise on a shared 2-core VM is about +-10%, so loops are measured in interleaved rounds
(bare, bare + augmentation, ours dense, ours pruned), each round's ratio taken, and the median ratio
reported. Two bare loops: on one ready batch (the least a step can cost), and with the same per-batch
work our loop does (index the uint8 images, crop, flip, normalise), which is the "same
configuration" the 3% target compares against. Our loop's time is its training part: per-epoch
evaluation is logged apart (eval_seconds) and reported apart. Random uint8 images stand in for
CIFAR-10 (speed does not depend on pixel values). --ddp runs one training on 2 processes (gloo,
1 thread each) against 1 process with 1 and with 2 threads, at the same global batch.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sslprune import distributed
from sslprune.config import Experiment
from sslprune.data import Dataset, Split
from sslprune.data.augment import Normalize, batch_crop, batch_flip_lr
from sslprune.lottery import build
from sslprune.models import MODELS, build_model
from sslprune.pruning import SCORES, MaskEnforcer, dense_mask, prunable, prune, prune_iteratively
from sslprune.runtime import Runtime
from sslprune.tasks.rotation import rotate4
from sslprune.train import train


def _sync(device) -> None:
    """Wait for the device: CUDA runs asynchronously, so a timer read without this measures launches."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def fake_cifar(n: int, n_test: int) -> Dataset:
    g = torch.Generator().manual_seed(0)

    def split(k):
        return Split(torch.randint(0, 256, (k, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(k) % 10)
    return Dataset("fake-cifar", split(n), split(n_test), [str(i) for i in range(10)])


def _model(model_name: str, data: Dataset, memory_format) -> nn.Module:
    backbone, task = build(Experiment.from_flat({"model": model_name, "task": "labels"}), data, seed=0)
    return nn.Sequential(backbone, task.head).train().to(memory_format=memory_format)


def _on(data: Dataset, device) -> Dataset:
    """The dataset's tensors on `device`, as train() keeps an in-memory dataset."""
    return Dataset(data.name, Split(data.train.images.to(device), data.train.labels.to(device)),
                   Split(data.test.images.to(device), data.test.labels.to(device)), data.classes)


def bare_loop(model_name: str, data: Dataset, batch: int, steps: int, windows: int, rt: Runtime,
              augment: bool = False) -> float:
    """The least a training step can be: forward, loss, backward, SGD step on a ready batch; with
    `augment`, each step first indexes a random batch of uint8 images, crops, flips and normalises it."""
    model = _model(model_name, data, rt.memory_format).to(rt.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if rt.compile:
        model.compile()
    norm = Normalize(*data.channel_stats(), memory_format=rt.memory_format).to(rt.device)
    data = _on(data, rt.device)
    g = torch.Generator(device=rt.device).manual_seed(0)
    x, y = norm(data.train.images[:batch]), data.train.labels[:batch]
    best = float("inf")
    for w in range(windows + 1):  # window 0 warms up (and compiles)
        _sync(rt.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            if augment:
                idx = torch.randperm(len(data.train), generator=g, device=rt.device)[:batch]
                x, y = norm(batch_flip_lr(batch_crop(data.train.images[idx], 2, g), g)), data.train.labels[idx]
            with rt.autocast():
                loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(rt.device)
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
        if not distributed.is_main():  # under torchrun only rank 0 writes the log
            return 0.0, 0.0, 0.0
        log = [json.loads(line) for line in (Path(d) / "log.jsonl").read_text().splitlines()]
    best = min(h["train_seconds"] for h in log[1:])
    return len(data.train) // batch * batch / best, min(h["eval_seconds"] for h in log[1:]), log[0]["train_seconds"]


class NullBackbone(nn.Module):
    """Almost no compute (a linear map of each image's channel means): what is left of a training
    step is the loop around the model, whose cost the paired ratios above cannot resolve (their
    noise is a few percent of a step)."""
    feature_dim = 16

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


def machinery_ms(data: Dataset, batch: int, steps: int, rounds: int, rt: Runtime) -> float:
    """Milliseconds per step that our loop adds to the bare loop with the same augmentation, both
    around NullBackbone (median over rounds of the paired difference)."""
    MODELS["null"] = NullBackbone
    try:
        diffs = []
        for _ in range(rounds):
            bare = bare_loop("null", data, batch, steps, 3, rt, augment=True)
            ours, _, _ = project_loop("null", data, batch, 3, 0, rt)
            diffs.append(batch / ours - batch / bare)
        return statistics.median(diffs) * 1e3
    finally:
        del MODELS["null"]


def step_flops(model_name: str, data: Dataset, batch: int) -> float:
    """Nominal FLOPs of one training step (forward + backward), counted by torch's FlopCounterMode
    as direct convolutions. oneDNN runs many 3x3 convs with Winograd, which does fewer arithmetic
    operations, so achieved nominal GFLOP/s can exceed the measured matrix-multiply peak."""
    model = _model(model_name, data, torch.contiguous_format)
    x = (data.train.images[:batch].float() / 255)
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(x), data.train.labels[:batch]).backward()
    return counter.get_total_flops()


def matmul_peak(n: int = 2048, reps: int = 10, device="cpu") -> float:
    """Measured fp32 matrix-multiply FLOP/s (the best of `reps`): the machine's practical peak."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def mask_cost(model_name: str, data: Dataset, calls: int = 20, device="cpu") -> float:
    """Seconds per call of the mask enforcement at 0.8^5 density (every layer pruned)."""
    backbone, _ = build(Experiment.from_flat({"model": model_name, "task": "labels"}), data, seed=0)
    mask = prune_iteratively(backbone, 5, 0.2)
    backbone.to(device, memory_format=torch.channels_last)
    enforce = MaskEnforcer(backbone, mask)
    enforce()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        enforce()
    _sync(device)
    return (time.perf_counter() - t0) / calls


def pipeline_rate(data: Dataset, batch: int, steps: int, device="cpu") -> float:
    """uint8 batch -> crop -> flip -> normalise -> 4 rotations, on the training device. Source images/s."""
    g = torch.Generator(device=device).manual_seed(0)
    norm = Normalize(*data.channel_stats(), memory_format=torch.channels_last).to(device)
    images = data.train.images.to(device)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randperm(len(images), generator=g, device=device)[:batch]
        rotate4(norm(batch_flip_lr(batch_crop(images[idx], 2, g), g)))
    _sync(device)
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


def ddp_child(model_name: str, batch: int, steps: int, local_bn: bool) -> None:
    """One process of a (torchrun) training: prints rank 0's best epoch images/s as JSON. local_bn:
    batch-norm statistics of each process's own images (not what sslprune runs: it attributes the
    cost of synchronising them)."""
    if local_bn:
        distributed.sync_batchnorm = lambda module, device="cpu": module
    distributed.init("cpu")
    rate, _, _ = project_loop(model_name, fake_cifar(batch * steps, batch), batch, 2, 0, Runtime("cpu"))
    if distributed.is_main():
        print(json.dumps({"rate": rate}))
    distributed.close()


def ddp_scaling(model_name: str, batch: int, steps: int) -> dict[str, float]:
    """Training images/s at global batch `batch`: 1 process x 1 thread, 1 x 2 threads, 2 x 1 (gloo),
    and 2 x 1 without synchronised batch-norm (what the 2 all-reduces per batch-norm layer cost)."""
    out = {}
    for label, threads, nproc, local in (("1 process, 1 thread", 1, 1, ""), ("1 process, 2 threads", 2, 1, ""),
                                         ("2 processes (gloo), 1 thread each", 1, 2, ""),
                                         ("  same, batch-norm not synchronised", 1, 2, "local")):
        child = [__file__, "--ddp-child", model_name, str(batch), str(steps), local or "sync"]
        launcher = [sys.executable] if nproc == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        r = subprocess.run([*launcher, *child], capture_output=True, text=True, check=True,
                           env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        out[label] = json.loads(r.stdout.strip().splitlines()[-1])["rate"]
    return out


def _allreduce_child(rank: int, port: int, out) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x = torch.zeros(129, dtype=torch.float64)       # a batch-norm layer's statistics (C = 64)
    for _ in range(10):
        dist.all_reduce(x)
    t0 = time.perf_counter()
    for _ in range(200):
        dist.all_reduce(x)
    if rank == 0:
        out.put((time.perf_counter() - t0) / 200)
    dist.destroy_process_group()


def allreduce_latency() -> float:
    """Seconds per all-reduce of 129 float64 between 2 local gloo processes (1 thread each)."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_allreduce_child, args=(port, out), nprocs=2, start_method="spawn")
    return out.get()


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
                   "torch.compile against the default (slow on a CPU without bf16 units: bf16 is ~50x slower there)")
    p.add_argument("--runtime-models", nargs="+", default=["convnet", "resnet20"],
                   help="models for --runtime (bf16 on a CPU without bf16 units makes big ones take hours)")
    p.add_argument("--ddp", action="store_true", help="also DDP scaling: 2 processes against 1 (CPU, gloo)")
    p.add_argument("--ddp-child", nargs=4, metavar=("MODEL", "BATCH", "STEPS", "BN"), help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.ddp_child:
        return ddp_child(args.ddp_child[0], int(args.ddp_child[1]), int(args.ddp_child[2]), args.ddp_child[3] == "local")
    rt = Runtime(args.device).resolved()
    peak = matmul_peak(device=args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"runtime {rt.fingerprint()}, {args.rounds} rounds of {args.windows} window(s) of {args.steps} steps")
    print(f"fp32 matrix-multiply peak (2048^3, measured): {peak / 1e9:.1f} GFLOP/s")
    seconds, n = global_prune_seconds()
    print(f"global prune step, resnet50 ({n / 1e6:.1f}M prunable weights): {seconds:.3f} s")
    for batch in args.batches:
        data = fake_cifar(batch * args.steps, batch)
        machinery = machinery_ms(fake_cifar(batch * 20, batch), batch, 20, 5, rt)
        print(f"\nloop machinery at batch {batch} (our loop minus the bare loop with the same augmentation, "
              f"around a model of almost no compute): {machinery:.2f} ms/step")
        for name in args.models:
            rounds = []
            for _ in range(args.rounds):
                bare_r = bare_loop(name, data, batch, args.steps, args.windows, rt)
                bare_aug_r = bare_loop(name, data, batch, args.steps, args.windows, rt, augment=True)
                dense_r, eval_s, _ = project_loop(name, data, batch, args.windows, 0, rt)
                pruned_r, _, _ = project_loop(name, data, batch, args.windows, 5, rt)
                rounds.append((bare_r, bare_aug_r, dense_r, pruned_r))
            bare, bare_aug, dense, pruned = (statistics.median(r[i] for r in rounds) for i in range(4))
            over_bare = statistics.median(r[0] / r[2] - 1 for r in rounds)
            over_dense = statistics.median(r[1] / r[2] - 1 for r in rounds)
            over_pruned = statistics.median(r[1] / r[3] - 1 for r in rounds)
            enforce = mask_cost(name, data, device=args.device)
            step = batch / dense
            pipe = pipeline_rate(data, batch, 50, args.device)
            gflops = step_flops(name, data, batch) / step
            print(f"\n{name}, batch {batch}")
            print(f"  bare loop, ready batch     {bare:9.1f} img/s   (rounds: {', '.join(f'{r[0]:.1f}' for r in rounds)})")
            print(f"  bare loop + augmentation   {bare_aug:9.1f} img/s   (rounds: {', '.join(f'{r[1]:.1f}' for r in rounds)})")
            print(f"  sslprune loop, dense mask  {dense:9.1f} img/s   time overhead {over_dense:+.1%} vs bare + "
                  f"augmentation, {over_bare:+.1%} vs ready batch (medians of paired ratios)")
            print(f"  sslprune loop, 0.8^5 mask  {pruned:9.1f} img/s   time overhead {over_pruned:+.1%} vs bare + augmentation")
            print(f"  loop machinery             {machinery:9.2f} ms/step = {machinery / 1e3 / step:.2%} of a dense step")
            print(f"  mask enforcement           {enforce * 1e3:9.2f} ms/step = {enforce / step:.2%} of a dense step")
            print(f"  per-epoch evaluation       {eval_s:9.2f} s ({batch} test images), logged apart")
            print(f"  data pipeline + RotNet x4  {pipe:9.1f} img/s = {pipe / dense:.0f}x the training rate")
            print(f"  achieved (nominal FLOPs)   {gflops / 1e9:9.1f} GFLOP/s = {gflops / peak:.0%} of the matmul peak")
            if args.runtime and name in args.runtime_models:
                variants = {"contiguous (NCHW)": Runtime(args.device, channels_last=False),
                            "bf16 autocast": Runtime(args.device, precision="bf16"),
                            "torch.compile": Runtime(args.device, compile=True)}
                for label, v in variants.items():
                    r, _, first = project_loop(name, data, batch, args.windows, 0, v)
                    print(f"  {label:<26} {r:9.1f} img/s = {r / dense:.2f}x the default; first epoch {first:.1f} s")
    if args.ddp:
        for name in args.runtime_models:
            batch = args.batches[-1]
            rates = ddp_scaling(name, batch, args.steps)
            base = rates["1 process, 1 thread"]
            print(f"\nDDP scaling, {name}, global batch {batch} (the machine has {os.cpu_count()} cores; "
                  f"one small gloo all-reduce between 2 processes: {allreduce_latency() * 1e3:.2f} ms)")
            for label, r in rates.items():
                print(f"  {label:<34} {r:9.1f} img/s = {r / base:.2f}x one thread")
    print(f"\npeak resident memory of this process: {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
