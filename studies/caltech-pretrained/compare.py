"""The comparison this study is for, in one table: mean per-class test accuracy on Caltech-101 of
every arm at every density, mean ± standard error over replicates, read from the report's
results.csv (the report puts the pre-trained arms under 'transfer', the from-scratch runs under
'task' and random pruning under 'retrain': three tables; here they sit side by side).

Usage: python compare.py RUNS REPORT  (reads REPORT/results.csv, writes REPORT/pretrained_vs_scratch.md)
"""
from __future__ import annotations

import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

METRIC = "test_mean_class_acc"  # Caltech-101's test split is unbalanced: mean per-class accuracy


def arm(row: dict, configs: dict) -> str | None:
    """The row's arm, or None for rows that are no arm's result (other metrics' tables)."""
    cfg = configs.get(row["experiment"])
    if cfg is None:
        return None
    if row["eval"].startswith("transfer") and row["reset"] == "pruned during transfer":
        return f"pre-trained on CIFAR-10 by {row['objective']}, rewind to it"
    if row["eval"] == "task" and not cfg["model"]["pretrained"]:
        return f"from scratch, rewind {cfg['prune']['rewind']}"
    if row["eval"] == "retrain" and row["reset"] == "random":
        return "random pruning, random init"
    return None


def main(runs: Path, report: Path) -> Path:
    configs = {d.name: json.loads((d / "config.json").read_text())["config"]
               for d in runs.iterdir() if (d / "config.json").exists()}
    cells = defaultdict(list)  # (arm, level) -> [(remaining, value) per replicate]
    with open(report / "results.csv", newline="") as f:
        for row in csv.DictReader(f):
            name = arm(row, configs) if row["metric"] == METRIC else None
            if name:
                cells[(name, int(row["level"]))].append((float(row["remaining"]), float(row["value"])))
    arms = sorted({a for a, _ in cells}, key=lambda a: (not a.startswith("pre"), a))
    levels = sorted({lv for _, lv in cells})
    lines = ["# Caltech-101: pre-trained then pruned vs trained from scratch", "",
             "Mean per-class test accuracy, mean ± s.e. over replicates (n per cell).", "",
             "| level | remaining | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
    for lv in levels:
        remaining = next(r for a in arms for r, _ in cells.get((a, lv), []))
        row = []
        for a in arms:
            v = [x for _, x in cells.get((a, lv), [])]
            if not v:
                row.append("")
                continue
            mean = sum(v) / len(v)
            if len(v) == 1:  # no spread to show
                row.append(f"{mean:.4f} (n=1)")
                continue
            se = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1) / len(v))
            row.append(f"{mean:.4f} ± {se:.4f} (n={len(v)})")
        lines.append(f"| {lv} | {remaining:.2%} | " + " | ".join(row) + " |")
    out = report / "pretrained_vs_scratch.md"
    out.write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    print(main(Path(sys.argv[1]), Path(sys.argv[2])))
