"""What a gated path really costs to run (issue "Self-supervision and dynamic computation", part 6):
the realised MACs of the gated path against measured latency, on CPU, for trained VICReg-Dual runs.

For each run (an experiment trained with --budget; replicate 1 unless --replicate), on its test split:
    dense       the dense path: an ordinary ResNet
    simulated   the gated path as trained: every conv computed in full, closed channels zeroed after
    compact     channels the gated path never opens on the training split removed physically
                (models.gated.compact_gated), the rest simulated: what `sslprune export --path gated` writes
    skipping    the compact network computing only each image's open channels (batch 1: one image)
timed side by side (median of --repeats alternating calls, sslprune.cost._medians) at batch 1 and 64;
every time is a ratio to the dense path's in the same call. MACs per image: the dense path's, the
gated path's realised mean over the test split (gate networks included), and the compact network's
with every kept channel open.

    python benchmarks/gated_speed.py studies/gated-cpu/runs/vicreg_resnet20_* --repeats 30

Pause other work while it runs: latency ratios are only as clean as the machine is idle.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sslprune import layout
from sslprune.cost import _medians
from sslprune.data import load_dataset
from sslprune.data.augment import Normalize
from sslprune.lottery import load_experiment
from sslprune.models import build_model
from sslprune.models.gated import compact_gated, dense_state, opened_channels


def networks(exp_dir: Path, replicate: int):
    """(experiment, data, dense ResNet, gated ResNet, its compact copy) of a trained level 0."""
    exp, saved = load_experiment(exp_dir)
    if not exp.task.budget:
        raise SystemExit(f"{exp_dir} was not trained with --budget: it has no gated path")
    data = load_dataset(exp.data, saved.get("data_root"))
    state = {k.removeprefix("backbone."): v for k, v in
             layout.load_model(layout.run_dir(layout.level_dir(exp_dir, replicate, 0))).items() if k.startswith("backbone.")}
    gated = build_model(exp.model.model, gated=True)
    gated.load_state_dict(state)
    dense = build_model(exp.model.model)
    dense.load_state_dict(dense_state(state))
    normalize = Normalize(*data.channel_stats())
    compact = compact_gated(gated, opened_channels(gated, data.train.images, normalize))
    return exp, data, normalize, dense.eval(), gated.eval(), compact.eval()


@torch.inference_mode()
def measure(exp_dir: Path, replicate: int, repeats: int) -> dict:
    exp, data, normalize, dense, gated, compact = networks(exp_dir, replicate)
    side = data.test.image_shape[-1]
    test = normalize(data.test.images)
    gated(test, path="gated")
    realised = float((gated.macs(gated.gates, side) / gated.dense_macs(side)).mean())
    stem, costs = compact.costs(side)
    static = (stem + sum(c.fixed_dense + c.gate + c.channels * c.per_open for c in costs)) / gated.dense_macs(side)
    row = {"run": exp_dir.name, "budget": exp.task.budget, "macs_realised": realised, "macs_compact": static}
    one, many = test[:1], test[:64]
    b1 = _medians([lambda: dense(one), lambda: gated(one, path="gated"), lambda: compact(one, path="gated"),
                   lambda: compact(one, path="skip")], repeats)
    b64 = _medians([lambda: dense(many), lambda: gated(many, path="gated"), lambda: compact(many, path="gated")], repeats)
    for name, t in zip(("simulated", "compact", "skipping"), b1[1:]):
        row[f"{name}_b1"] = b1[0] / t
    for name, t in zip(("simulated", "compact"), b64[1:]):
        row[f"{name}_b64"] = b64[0] / t
    row["dense_ms_b1"], row["dense_ms_b64"] = 1000 * b1[0], 1000 * b64[0]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="experiment folders trained with --budget")
    p.add_argument("--replicate", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: as torch chooses)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cols = ["budget", "macs_realised", "macs_compact", "simulated_b1", "compact_b1", "skipping_b1",
            "simulated_b64", "compact_b64", "dense_ms_b1", "dense_ms_b64"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for run in args.runs:
        row = measure(run, args.replicate, args.repeats)
        print("| " + " | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols) + " |",
              flush=True)


if __name__ == "__main__":
    main()
