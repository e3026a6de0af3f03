"""Time `sslprune export` of a ResNet-50 level at 224x224 (target: under 10 s on a 2-core CPU).

Builds a small channel-granularity run (random 224x224 images, 2 classes, one short epoch per level,
levels 0-1: what is timed is the export, not the training), then times the export of level 1 in
this process (safetensors; safetensors + ONNX) and through the CLI (Python start-up included).

    python benchmarks/export_resnet50.py [--root DIR]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sslprune import export
from sslprune.config import Experiment
from sslprune.data import Dataset, Split
from sslprune.lottery import prepare, run_replicate


def tiny_imagenet_like(n: int = 16, size: int = 224) -> Dataset:
    g = torch.Generator().manual_seed(0)

    def split():
        return Split(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g), torch.arange(n) % 2)
    return Dataset("random224", split(), split(), ["a", "b"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=None, help="run root [default: a temporary folder]")
    args = p.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="export-r50-"))
    exp = Experiment.from_flat(dict(dataset="digits", model="resnet50", task="labels", optimizer="adam", lr=1e-4,
                                    batch_size=8, epochs=1, rewind="1it", granularity="channel", fraction=0.5))
    data = tiny_imagenet_like()
    exp_dir = prepare(exp, root, data, None, ["benchmark"])
    t = time.perf_counter()
    run_replicate(exp, exp_dir, data, 1, 1, progress=False)
    print(f"run (2 levels, 1 epoch each): {time.perf_counter() - t:.1f} s")
    for formats in (("safetensors",), ("safetensors", "onnx")):
        t = time.perf_counter()
        info = export.export(exp_dir, 1, 1, root / f"export_{'_'.join(formats)}", formats)
        print(f"export level 1 ({' + '.join(formats)}), in process: {time.perf_counter() - t:.2f} s; MACs "
              f"{info['cost']['macs'] / info['dense_cost']['macs']:.3f}x of dense, params "
              f"{info['cost']['params'] / info['dense_cost']['params']:.3f}x")
    cli = Path(sys.executable).parent / "sslprune"
    t = time.perf_counter()
    subprocess.run([str(cli), "export", str(exp_dir), "--level", "1", "--format", "safetensors,onnx",
                    "--out", str(root / "export_cli")], check=True)
    print(f"sslprune export --format safetensors,onnx (CLI, start-up included): {time.perf_counter() - t:.2f} s")
    t = time.perf_counter()
    export.load_exported(root / "export_cli")
    print(f"load_exported: {time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
