"""Natural sparsity (Caron et al. 2020, Fig. 6 and 10): how many prunable weights a trained network
already has at (about) zero. Trained with Adam + L2 on CIFAR-10, the paper finds 80-85% of them at
machine precision; pruning below that rate only removes weights that were zero anyway.

A weight counts as naturally zero when |w| <= threshold; the default threshold is the machine
epsilon of the weights' dtype (1.19e-7 for float32).
"""
from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path

import torch

from . import layout
from .errors import UserError
from .lottery import load_experiment
from .models import build_backbone
from .pruning import prunable
from .figures import save_png
from .report import mean_se


def threshold_for(weights: dict[str, torch.Tensor], threshold: float | None) -> float:
    if threshold is not None:
        return threshold
    dtype = next(iter(weights.values())).dtype
    return float(torch.finfo(dtype).eps)


def natural_zeros(weights: dict[str, torch.Tensor], threshold: float | None = None) -> dict[str, torch.Tensor]:
    """{name: bool tensor}, True where |w| <= threshold."""
    t = threshold_for(weights, threshold)
    return {n: w.detach().abs().cpu() <= t for n, w in weights.items()}


def natural_sparsity(weights: dict[str, torch.Tensor], threshold: float | None = None,
                     mask: dict[str, torch.Tensor] | None = None) -> dict:
    """Per layer and in total: {'threshold', 'layers': [{'layer', 'zeros', 'total', 'fraction'}],
    'total': {...}}. With a mask, over the weights it keeps (pruned ones are zero by construction)."""
    zeros = natural_zeros(weights, threshold)
    kept = mask or {n: torch.ones_like(z) for n, z in zeros.items()}
    layers = [{"layer": n, "zeros": int((z & kept[n]).sum()), "total": int(kept[n].sum()),
               "fraction": int((z & kept[n]).sum()) / max(1, int(kept[n].sum()))} for n, z in zeros.items()]
    count, total = sum(r["zeros"] for r in layers), sum(r["total"] for r in layers)
    return {"threshold": threshold_for(weights, threshold), "layers": layers,
            "total": {"layer": "total", "zeros": count, "total": total, "fraction": count / total}}


def adjusted_random_scores(zeros: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Scores for `pruning.prune` that remove naturally-zero weights first (in random order), then
    random others: a random score in [0, 1) plus 1 for every weight that is not naturally zero."""
    return {n: torch.rand(z.shape, generator=generator) + (~z).float() for n, z in zeros.items()}


INIT = -1  # the 'level' of a replicate's initial weights (init.safetensors), shown as 'init'


def collect(exp_dirs, thresholds=(None,), levels=(0,), with_init: bool = False) -> list[dict]:
    """One row per (experiment, replicate, level, threshold, layer incl. 'total') of trained networks;
    with_init adds each replicate's initial weights (level INIT): the mass near zero that training
    started from, without which a fraction at a loose threshold means little."""
    rows = []
    for exp_dir in exp_dirs:
        exp, _ = load_experiment(exp_dir)
        names = list(prunable(build_backbone(exp)))
        for replicate in layout.replicates(exp_dir):
            rdir = layout.replicate_dir(exp_dir, replicate)
            for level in ([INIT] if with_init else []) + list(levels):
                if level == INIT:
                    if not (rdir / layout.INIT).exists():
                        continue
                    trained, mask = layout.load_tensors(rdir / layout.INIT), None
                else:
                    run = layout.run_dir(layout.level_dir(exp_dir, replicate, level))
                    if not layout.is_done(run):
                        continue
                    trained = layout.load_model(run)
                    mask = layout.load_mask(run.parent / layout.MASK)
                weights = {n: trained[f"backbone.{n}"] for n in names}
                for t in thresholds:
                    s = natural_sparsity(weights, t, mask)
                    for r in [*s["layers"], s["total"]]:
                        rows.append({"experiment": Path(exp_dir).name, "replicate": replicate,
                                     "level": "init" if level == INIT else level, "threshold": s["threshold"], **r})
    return rows


def write_report(exp_dirs, out, thresholds=(None,), levels=(0,), with_init: bool = False) -> dict:
    """natural_sparsity.csv (every layer), .md (totals, mean ± s.e. over replicates; per-layer
    means) and .png (per-layer fraction, one line per experiment and level)."""
    rows = collect(exp_dirs, thresholds, levels, with_init)
    if not rows:
        raise UserError(f"no trained level {list(levels)} in {', '.join(map(str, exp_dirs))}; "
                        f"run 'sslprune lottery' first")
    out = Path(out)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    groups = defaultdict(list)  # keyed by level as a string: 'init' sorts after the numbers
    for r in rows:
        groups[(r["experiment"], str(r["level"]), r["threshold"], r["layer"])].append(r["fraction"])

    lines = ["# Natural sparsity", "", "Fraction of prunable weights with |w| <= threshold (machine epsilon of the "
             "dtype unless given), among the weights the level's mask keeps; mean ± s.e. over replicates.", "",
             "| experiment | level | threshold | total | n |", "|---|---|---|---|---|"]
    for (e, lv, t, layer), v in sorted(groups.items()):
        if layer == "total":
            m, se, _ = mean_se(v)
            lines.append(f"| {e} | {lv} | {t:.3g} | {m:.2%}" + ("" if math.isnan(se) else f" ± {se:.2%}") + f" | {len(v)} |")
    lines += ["", "## Per layer (mean over replicates)", "", "| experiment | level | threshold | layer | fraction |",
              "|---|---|---|---|---|"]
    for (e, lv, t, layer), v in groups.items():
        if layer != "total":
            lines.append(f"| {e} | {lv} | {t:.3g} | {layer} | {mean_se(v)[0]:.2%} |")
    paths = {"csv": out / "natural_sparsity.csv", "md": out / "natural_sparsity.md", "png": out / "natural_sparsity.png"}
    layout.save_text(paths["csv"], buf.getvalue())
    layout.save_text(paths["md"], "\n".join(lines) + "\n")
    _plot(groups, paths["png"])
    return paths


def _plot(groups, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = sorted({(e, lv, t) for e, lv, t, _ in groups})
    fig, ax = plt.subplots(figsize=(10, 4))
    for e, lv, t in curves:
        layers = [layer for (e2, lv2, t2, layer) in groups if (e2, lv2, t2) == (e, lv, t) and layer != "total"]
        ys = [100 * sum(groups[(e, lv, t, layer)]) / len(groups[(e, lv, t, layer)]) for layer in layers]
        ax.plot(range(len(layers)), ys, marker="o", ms=3, label=f"{e} {'L' + lv if lv != 'init' else 'init'} (|w| <= {t:.2g})")
    ax.set_xlabel("prunable layer (input to output)")
    ax.set_ylabel("naturally zero weights (%)")
    ax.set_title("Natural sparsity per layer")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    save_png(fig, path)
