"""What a pruned network costs to run: parameters, MACs per image, and measured latency.

`sslprune eval cost RUN` writes, beside each mask, cost.json: the counts of the network that mask
gives (the compact one for channel granularity, the masked dense one for weight granularity) and
its latency in PyTorch eager (CPU, batch 1 and 64; CUDA too when there is one) and in onnxruntime,
each next to the dense network's, measured in the same invocation: ratios, not absolute times,
are what compare across machines.

MACs come from torch.utils.flop_counter (FLOPs / 2) on one forward pass; tests check them against
an analytic count. A latency is the median of `repeats` timed calls after warm-up, the pruned and
the dense network timed in alternation on the same inputs.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from . import layout
from .errors import UserError
from .pruning import prunable

BATCHES = (1, 64)


def count(net: nn.Module, shape: tuple[int, int, int]) -> dict:
    """Parameters (all; conv/linear weights of the backbone; the non-zero ones) and MACs per image."""
    from torch.utils.flop_counter import FlopCounterMode

    weights = prunable(getattr(net, "backbone", net))
    ghost = copy.deepcopy(net).to("meta").eval()  # shapes only: counting computes nothing
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ghost(torch.zeros(1, *shape, device="meta"))
    return {"params": sum(p.numel() for p in net.parameters()),
            "params_prunable": sum(w.numel() for w in weights.values()),
            "params_nonzero": sum(w.numel() if w.is_meta else int(w.count_nonzero()) for w in weights.values()),
            "macs": counter.get_total_flops() // 2}


def _medians(calls: list, repeats: int, sync=lambda: None) -> list[float]:
    """Median seconds of each call, timed in alternation (a, b, a, b, ...) so that a change in the
    machine's load during the measurement reaches every call alike and cancels in their ratio."""
    for call in calls:  # warm-up: allocator, oneDNN primitive cache, cuDNN autotuning
        call(), call()
    sync()
    times = [[] for _ in calls]
    for _ in range(repeats):
        for call, ts in zip(calls, times):
            t = time.perf_counter()
            call()
            sync()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def latencies(nets: list[nn.Module], shape: tuple[int, int, int], batches=BATCHES, repeats: int = 10,
              onnx: list[Path] | None = None) -> list[dict[str, float]]:
    """Per network, {'torch_cpu_b1': seconds, ..., 'onnxruntime_b64': ..., 'torch_cuda_b64': ...}:
    the networks timed side by side, each batch the same for all."""
    out = [{} for _ in nets]

    def record(key, calls, sync=lambda: None):
        for d, s in zip(out, _medians(calls, repeats, sync)):
            d[key] = s

    nets = [n.eval() for n in nets]
    with torch.inference_mode():
        for b in batches:
            x = torch.rand(b, *shape)
            record(f"torch_cpu_b{b}", [lambda n=n: n(x) for n in nets])
        if torch.cuda.is_available():
            for b in batches:
                x = torch.rand(b, *shape, device="cuda")
                gpus = [n.to("cuda") for n in nets]
                record(f"torch_cuda_b{b}", [lambda n=n: n(x) for n in gpus], torch.cuda.synchronize)
            nets = [n.to("cpu") for n in nets]
    if onnx is not None:
        from .export import onnx_session
        sessions = [onnx_session(p) for p in onnx]
        for b in batches:
            x = {"images": torch.rand(b, *shape).numpy()}
            record(f"onnxruntime_b{b}", [lambda s=s: s.run(None, x) for s in sessions])
    return out


def cost_run(exp_dir: Path, pairs: list[tuple[int, int]], repeats: int = 10, use_onnx: bool = True,
             progress=print) -> int:
    """cost.json beside every mask of the given (replicate, level) pairs (the lottery's and the
    random baselines'), each against the dense network measured first in this call. A mask's cost
    depends on which weights it keeps, not on their values: the network is built from the
    architecture. Returns the number of files written; existing ones are kept."""
    from .export import Standalone, compact_network, input_spec
    from .lottery import load_experiment
    from .models import build_backbone
    from .pruning import apply_mask

    exp, saved = load_experiment(exp_dir)
    shape, mean, std = input_spec(exp_dir, exp, saved)
    shape = tuple(shape)
    masks = []
    for r, level in pairs:
        ldir = layout.level_dir(exp_dir, r, level)
        own = [e.mask for e in layout.evaluations(ldir) if e.kind == "retrain" and e.mask != ldir / layout.MASK]
        masks += [p for p in [ldir / layout.MASK, *own] if p.exists() and not (p.parent / layout.COST).exists()]
    if not masks:
        return 0

    def network(mask=None) -> Standalone:
        torch.manual_seed(0)
        backbone = build_backbone(exp)
        if mask is None:
            return Standalone(backbone, None, mean, std).eval()
        apply_mask(backbone, mask)
        return compact_network(Standalone(backbone, None, mean, std).eval(), exp.prune.granularity, mask)

    dense_net = network()
    dense = count(dense_net, shape)
    with tempfile.TemporaryDirectory() as scratch:  # the ONNX files timed, not kept
        dense_onnx = _onnx_of(dense_net, shape, Path(scratch) / "dense.onnx") if use_onnx else None
        for path in masks:
            net = network(layout.load_mask(path))
            counts = count(net, shape)
            onnx = [dense_onnx, _onnx_of(net, shape, Path(scratch) / "net.onnx")] if use_onnx else None
            base, seconds = latencies([dense_net, net], shape, repeats=repeats, onnx=onnx)
            result = {**counts, "macs_ratio": counts["macs"] / dense["macs"],
                      "params_ratio": counts["params_nonzero"] / dense["params_nonzero"],
                      "speedup": {k: base[k] / v for k, v in seconds.items()},
                      "seconds": seconds, "granularity": exp.prune.granularity, "shape": list(shape),
                      "dense": {**dense, "seconds": base}}
            layout.save_json(path.parent / layout.COST, result)
            progress(f"{path.parent.relative_to(exp_dir)}: MACs x{result['macs_ratio']:.3f}, speed-up "
                     + ", ".join(f"{k} {v:.2f}x" for k, v in result["speedup"].items()))
    return len(masks)


def _onnx_of(net: nn.Module, shape, path: Path) -> Path:
    from .export import onnx_bytes
    path.write_bytes(onnx_bytes(net, shape))
    return path


def cost_levels(exp_dir: Path, replicates: list[int] | None = None, levels: list[int] | None = None,
                repeats: int = 10, onnx: bool = True) -> tuple[int, int]:
    """`sslprune eval cost`: every level with a mask (filtered); returns (files written, levels)."""
    if repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {repeats}")
    if onnx:
        from .export import _need_onnx
        _need_onnx()
    from .lottery import pick_levels
    masked = [(r, lv) for r, lv, ldir in layout.levels(exp_dir) if (ldir / layout.MASK).exists()]
    pairs = pick_levels(exp_dir, replicates, levels, available=masked, what="masked")
    return cost_run(exp_dir, pairs, repeats, onnx), len(pairs)


class Cost:
    """The registry's entry (sslprune/evaluations.py): `sslprune eval cost RUN`. Not a sweep's: its
    latencies need the machine to itself, and a sweep's workers share theirs."""
    name, top_level = "cost", False
    help = "params, MACs and measured latency of every level's compact network"
    description = ("For every mask of the run (each level's, and the random baselines'): parameters, MACs "
                   "per image (torch.utils.flop_counter) and the median latency of the network it gives "
                   "(channel granularity: channels removed; weight granularity: the dense network, zeros and "
                   "all) in PyTorch eager at batch 1 and 64 (CPU; CUDA too when there is one) and in "
                   "onnxruntime, as speed-ups over the dense network measured in the same call. Writes "
                   "cost.json beside each mask; 'sslprune report' shows them.")

    def spec(self, value, where: str, here: Path, experiments) -> tuple:
        raise UserError(f"{where}: cost times networks on an idle machine, which a sweep's workers are not; "
                        f"drop it and run 'sslprune eval cost RUN' on each experiment after the sweep")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        from .cli import run_args
        run_args(p, "every level with a mask")
        p.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (median) [default: 10]")
        p.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True,
                       help="also time onnxruntime (needs sslprune[export]) [default: on]")

    def command(self, args, argv: list[str]) -> int:
        written, n = cost_levels(args.run_dir, args.replicates, args.level, args.repeats, args.onnx)
        print(f"{written} cost.json written ({n} levels)")
        return 0


COST = Cost()
