"""The command lines that run sweep specs' steps with several processes per training (torchrun).

`sslprune sweep` runs every step in one process on one device. At the paper's ImageNet batch sizes
(1,536-2,048 images; RotNet and S4L show each image in 4 rotations) a ResNet-50 training needs
several GPUs, which `sslprune lottery` and `sslprune retrain` get under torchrun. This script reads
each spec with sslprune.sweep.load_spec and writes the commands for the same experiments, in the
same run root. So `sslprune sweep SPEC --status` follows their progress, and `sslprune report`
reads them as a sweep's runs.

Per (experiment, replicate) it prints one lottery line (its chain of levels 0..levels), then one
line per re-training variant. A re-training line re-trains the levels trained so far and skips finished
ones. Run it after the lottery line, or run it again until every level is done. With `level = [...]`
under the spec's [evaluations] there is one line per variant and listed level instead, which runs once
that level has its mask. Lines resume when
run again and lock their steps, so any number of machines can take them in any order.

Usage: python commands.py [--launcher 'torchrun --standalone --nproc_per_node 8 -m'] SPEC.toml...
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from sslprune.cli import parser, resolve
from sslprune.config import Experiment
from sslprune.sweep import load_spec


def config_flags(exp: Experiment) -> list[str]:
    """`sslprune lottery` flags that build `exp`: its non-default fields, the ones its name hashes."""
    out = []
    for section in exp.non_default().values():
        for name, value in section.items():
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):  # every boolean field defaults to False
                out.append(flag)
            elif isinstance(value, list):
                out += [flag, ",".join(str(v) for v in value)]
            else:
                out += [flag, str(value)]
    return out


def commands(spec_path: Path, launcher: list[str]) -> list[str]:
    spec = load_spec(spec_path)
    lines = []
    for exp in spec.experiments:
        flags = config_flags(exp)
        built, _ = resolve(parser().parse_args(["lottery", *flags]))  # the CLI builds the sweep's experiment
        if built != exp:
            raise SystemExit(f"{spec_path}: the flags {flags} build another experiment than the spec's "
                             f"{exp.name()}; this script needs updating")
        run_dir = spec.root / exp.name()
        for r in range(1, spec.replicates + 1):
            only = f"{r}-{r}"  # '--replicates 3' would mean 1..3
            data = ["--data-root", spec.data_root] if spec.data_root else []
            lines.append(shlex.join([*launcher, "sslprune", "lottery", *flags, "--root", str(spec.root), *data,
                                     "--levels", str(spec.levels), "--replicates", only, "--device", spec.device,
                                     "--quiet"]))
            # [evaluations] level: a line per level, which can run as soon as that level has its mask
            levels = [["--level", str(lv)] for lv in spec.evaluated] if spec.evaluated else [[]]
            for variant in spec.evaluations.get("retrain", ()):
                lines += [shlex.join([*launcher, "sslprune", "retrain", str(run_dir), "--variants", variant,
                                      "--replicates", only, *level, "--device", spec.device, "--quiet"]) for level in levels]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("specs", type=Path, nargs="+", help="sweep specs (TOML)")
    p.add_argument("--launcher", default="", help="prefix of every command, e.g. "
                   "'torchrun --standalone --nproc_per_node 8 -m' [default: none, one process]")
    args = p.parse_args()
    for spec in args.specs:
        print("\n".join(commands(spec, shlex.split(args.launcher))))


if __name__ == "__main__":
    main()
