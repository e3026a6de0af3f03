"""Channel against weight granularity on a CIFAR-10 subset: accuracy after re-training on labels,
MACs, parameters and measured latency of the network each level gives (issue "Networks in and out").

For each model (ResNet-20, the convnet), objective (labels, RotNet) and granularity, one replicate:
    sslprune lottery --granularity G --levels L ...        # 20% of the surviving channels / weights per level
    sslprune retrain RUN --variants rewind                 # every level's mask re-trained on labels
    sslprune eval cost RUN                                 # params, MACs, latency vs dense (same call)
then the table: per run, the level with the fewest MACs whose re-trained accuracy is within 1 point
of the dense network's (level 0 re-trained), with its speed-ups; and the same for weight granularity
at that accuracy. Everything goes through the CLI, as a user would run it.

    python benchmarks/channel_vs_weight.py --root ~/bench-runs            # train, measure, print
    python benchmarks/channel_vs_weight.py --root ~/bench-runs --stage table

Latency ratios are only as clean as the machine is idle while `eval cost` runs: pause other work.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-images/cifar10-images.tar.gz"
COMMON = ["--dataset", "imagefolder", "--train-per-class", "500", "--test-per-class", "100", "--optimizer", "adam",
          "--lr", "1e-3", "--weight-decay", "1e-4", "--batch-size", "128", "--schedule", "cosine", "--crop-pad", "2",
          "--flip", "--rewind", "1ep", "--replicates", "1", "--quiet"]
LEVELS = {"channel": 4, "weight": 3}   # channel levels reach ~1/5 of the MACs; weight levels never change them


def sh(*args: str) -> str:
    t = time.time()
    out = subprocess.run([str(Path(sys.executable).parent / "sslprune"), *args], check=True, capture_output=True,
                         text=True).stdout
    print(f"  {time.time() - t:7.1f} s  sslprune {args[0]}", flush=True)
    return out.strip().splitlines()[-1]


def runs(args) -> list[tuple[str, str, str, Path]]:
    out = []
    for model in args.models:
        for task in args.tasks:
            for gran in args.granularities:
                flags = [*COMMON, "--data-root", str(args.data), "--model", model, "--task", task, "--epochs",
                         str(args.epochs), "--granularity", gran, "--levels", str(LEVELS[gran]), "--root", str(args.root)]
                if gran == "channel" and args.channel_round > 1:   # a run of its own (its name differs)
                    flags += ["--channel-round", str(args.channel_round)]
                    gran = f"channel, multiples of {args.channel_round}"
                out.append((model, task, gran, flags))
    return out


def train(args) -> None:
    for model, task, gran, flags in runs(args):
        print(f"{model} {task} {gran}", flush=True)
        exp = sh("lottery", *flags)
        sh("retrain", exp, "--variants", "rewind", "--quiet")


def measure(args) -> None:
    for model, task, gran, flags in runs(args):
        exp = sh("lottery", *flags)   # already trained: prints its directory
        sh("eval", "cost", exp, "--repeats", str(args.repeats))


def table(args) -> None:
    rows = []
    for model, task, gran, flags in runs(args):
        exp = Path(sh("lottery", *flags))
        levels = []
        for level in range(LEVELS[gran.split(",")[0]] + 1):
            ldir = exp / "replicate_1" / f"level_{level}"
            done, cost = ldir / "retrain_rewind" / "done.json", ldir / "cost.json"
            if done.exists() and cost.exists():
                density = json.loads((ldir / "density.json").read_text())
                density = density["layers"] if isinstance(density, dict) else density  # (before sealing: a list)
                levels.append((level, json.loads(done.read_text())["test_acc"], json.loads(cost.read_text()),
                               density[-1]["density"]))
        if not levels:
            continue
        dense_acc = levels[0][1]
        within = [lv for lv in levels if lv[1] >= dense_acc - 0.01]
        best = min(within, key=lambda lv: (lv[2]["macs"], lv[2]["params_nonzero"]))  # weight: the sparsest
        rows.append((model, task, gran, dense_acc, best, levels))
    keys = ["torch_cpu_b1", "torch_cpu_b64", "onnxruntime_b1", "onnxruntime_b64"]
    print("\n| model | objective | granularity | dense acc. | level | weights kept | acc. | MACs | params | "
          + " | ".join(f"speed-up {k}" for k in keys) + " |")
    print("|---|---|---|---|---|---|---|---|---|" + "---|" * len(keys))
    for model, task, gran, dense_acc, (level, acc, cost, kept), _ in rows:
        print(f"| {model} | {task} | {gran} | {dense_acc:.3f} | {level} | {kept:.1%} | {acc:.3f} | "
              f"{cost['macs_ratio']:.3f}x | {cost['params_nonzero']:,} | "
              + " | ".join(f"{cost['speedup'].get(k, float('nan')):.2f}x" for k in keys) + " |")
    print("\nEvery level:\n\n| model | objective | granularity | level | weights kept | acc. (re-trained) | MACs | params | "
          + " | ".join(f"speed-up {k}" for k in keys) + " |")
    print("|---|---|---|---|---|---|---|---|" + "---|" * len(keys))
    for model, task, gran, _, _, levels in rows:
        for level, acc, cost, kept in levels:
            print(f"| {model} | {task} | {gran} | {level} | {kept:.1%} | {acc:.3f} | {cost['macs_ratio']:.3f}x | "
                  f"{cost['params_nonzero']:,} | " + " | ".join(f"{cost['speedup'].get(k, float('nan')):.2f}x" for k in keys) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True, help="run root (outside the checkout)")
    p.add_argument("--data", type=Path, default=DATA, help="the CIFAR-10 ImageFolder .tar.gz [default: shared/data's]")
    p.add_argument("--models", nargs="+", default=["resnet20", "convnet"])
    p.add_argument("--tasks", nargs="+", default=["labels", "rotation"])
    p.add_argument("--granularities", nargs="+", default=["channel", "weight"])
    p.add_argument("--channel-round", type=int, default=1,
                   help="channel runs keep a multiple of N channels per layer (--channel-round) [default: 1, off]")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--repeats", type=int, default=20, help="timed calls per latency (median)")
    p.add_argument("--stage", choices=["all", "train", "measure", "table"], default="all")
    args = p.parse_args()
    if args.stage in ("all", "train"):
        train(args)
    if args.stage in ("all", "measure"):
        measure(args)
    if args.stage in ("all", "table"):
        table(args)


if __name__ == "__main__":
    main()
