"""Where each mask keeps its weights: the kept fraction of every pruned layer against the level, for
the lottery's own masks and the random baselines' (`sslprune report`: layer_density.csv, a section of
summary.md, layer_density.png).

Why a report needs it: global pruning ranks every weight of the network together, so a layer whose
weights start small can all but vanish while another stays nearly whole. In the cifar10-cpu study a
label mask at 3.5% keeps 74% of the convnet's first conv and 0.4% of its last (replicate 1), where
random pruning keeps ~3.5% of each: the same remaining weights, two very different networks.

layer_density.csv columns: experiment, objective, mask (lottery | random | random_adjusted),
replicate, level, remaining (over the pruned layers, as results.csv), layer, kept, total, density.
"""
from __future__ import annotations

import math
import textwrap
from collections import defaultdict
from pathlib import Path

from . import layout
from .figures import percent, percent_axis, save_png, thin_labels
from .lottery import load_experiment
from .models import build_backbone
from .pruning import prunable, pruned_layers

COLUMNS = ["experiment", "objective", "mask", "replicate", "level", "remaining", "layer", "kept", "total", "density"]


def mask_counts(path: Path, cache: dict) -> dict[str, tuple[int, int]]:
    """{layer: (kept, total)} of a mask, read (and checked against its seal: a damaged mask is
    refused, never counted) once per report however many evaluations share it."""
    if path not in cache:
        cache[path] = {n: (int(m.sum()), m.numel()) for n, m in layout.load_mask(path).items()}
    return cache[path]


def collect(exp_dirs: list[Path], names: dict[Path, str], cache: dict | None = None) -> list[dict]:
    """A row per (mask, layer) of every level on disk: the lottery's mask, and each random baseline's
    where its re-training finished (as results.csv has them), layers in the network's order (input
    side first). names: each experiment directory's curve label (report.labels); cache: mask_counts'."""
    cache = {} if cache is None else cache
    rows = []
    for exp_dir in exp_dirs:
        exp, _ = load_experiment(exp_dir)
        backbone = build_backbone(exp)
        order = pruned_layers(backbone, exp.prune.layers) or list(prunable(backbone))
        mine = []
        for replicate, level, ldir in layout.levels(exp_dir):
            masks = {"lottery": ldir / layout.MASK}
            masks |= {e.reset: e.mask for e in layout.evaluations(ldir)
                      if e.kind == "retrain" and e.reset.startswith("random") and layout.is_done(e.path)}
            for source, path in masks.items():
                if not path.exists():
                    continue
                counts = mask_counts(path, cache)
                kept, total = sum(counts[n][0] for n in order), sum(counts[n][1] for n in order)
                mine += [dict(experiment=Path(exp_dir).name, objective=names[Path(exp_dir).resolve()], mask=source,
                              replicate=replicate, level=level, remaining=kept / total, layer=n, kept=counts[n][0],
                              total=counts[n][1], density=counts[n][0] / counts[n][1]) for n in order]
        if any(r["level"] > 0 for r in mine):   # a dense-only run (the gated study's) has nothing to show
            rows += mine
    return rows


def summarise(rows: list[dict]) -> dict[tuple, dict]:
    """(objective, mask, level) -> {'remaining', 'n', 'layers': {layer: mean density}, 'total': {layer: n}},
    the mean over the replicates that have the level."""
    out = {}
    for key, group in _group(rows, ("objective", "mask", "level")).items():
        per_layer = _group(group, ("layer",))
        out[key] = {"remaining": sum(r["remaining"] for r in group) / len(group),
                    "n": len({r["replicate"] for r in group}),
                    "layers": {lay: sum(r["density"] for r in g) / len(g) for (lay,), g in per_layer.items()},
                    "total": {lay: g[0]["total"] for (lay,), g in per_layer.items()}}
    return out


def _group(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    groups = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in keys)].append(r)
    return dict(groups)


def markdown(summary: dict[tuple, dict]) -> str:
    """Each mask's layers at its curve's deepest level: a row per curve and a column per layer, or the
    other way round when there are more layers than curves (a ResNet-50 has 53)."""
    if not summary:
        return ""
    deepest = {}
    for (obj, mask, level) in summary:
        deepest[(obj, mask)] = max(level, deepest.get((obj, mask), level))
    curves = sorted(deepest, key=lambda c: (c[0], c[1] != "lottery", c[1]))
    at = {c: summary[(*c, deepest[c])] for c in curves}
    layers = list(dict.fromkeys(lay for c in curves for lay in at[c]["layers"]))
    # weights per layer: one number, or each model's where two models share a layer's name
    total = {lay: " / ".join(f"{t:,}" for t in dict.fromkeys(at[c]["total"][lay] for c in curves if lay in at[c]["total"]))
             for lay in layers}
    name = {c: f"{c[0]}, {c[1]} mask: level {deepest[c]}, {percent(100 * at[c]['remaining'])}% (n={at[c]['n']})"
            for c in curves}
    cell = lambda c, lay: "" if lay not in at[c]["layers"] else f"{100 * at[c]['layers'][lay]:.3g}%"  # noqa: E731
    lines = ["## Where the masks keep their weights", "",
             "Kept fraction of each pruned layer at each curve's deepest level (mean over replicates; every "
             "level in layer_density.csv and layer_density.png). Global pruning (the default) ranks all "
             "layers' weights together, so layers may end very unequal; `--scope layer` keeps them alike.", ""]
    if len(layers) <= len(curves):
        lines += ["| mask | " + " | ".join(f"{lay} ({total[lay]})" for lay in layers) + " |",
                  "|---|" + "---|" * len(layers)]
        lines += [f"| {name[c]} | " + " | ".join(cell(c, lay) for lay in layers) + " |" for c in curves]
    else:
        lines += ["| layer | weights | " + " | ".join(name[c] for c in curves) + " |", "|---|---|" + "---|" * len(curves)]
        lines += [f"| {lay} | {total[lay]} | " + " | ".join(cell(c, lay) for c in curves) + " |" for lay in layers]
    return "\n".join(lines + [""])


def plot(summary: dict[tuple, dict], path: Path):
    """A panel per objective: each layer's kept fraction (log) against the level's remaining weights,
    the lottery's masks solid, the random baselines' dashed, a colour per layer (dark: input side).
    Returns the (closed) figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import matplotlib.ticker

    objectives = sorted({obj for obj, _, _ in summary})
    cols, rows_ = min(3, len(objectives)), math.ceil(len(objectives) / 3)
    fig, axes = plt.subplots(rows_, cols, figsize=(6 * cols, 4.5 * rows_), squeeze=False)
    for ax in axes.flat[len(objectives):]:
        ax.set_visible(False)
    for ax, obj in zip(axes.flat, objectives):
        keys = sorted(k for k in summary if k[0] == obj)
        layers = list(dict.fromkeys(lay for k in keys for lay in summary[k]["layers"]))
        # viridis by depth, stopping short of its pale yellow end (unreadable on white)
        colours = matplotlib.colormaps["viridis"]([0.85 * i / max(1, len(layers) - 1) for i in range(len(layers))])
        named = len(layers) <= 10   # a legend entry per layer; beyond, the first and the last
        for mask in sorted({k[1] for k in keys}, key=lambda m: (m != "lottery", m)):
            pts = sorted((k for k in keys if k[1] == mask), key=lambda k: -summary[k]["remaining"])
            for i, lay in enumerate(layers):
                # an emptied layer has no place on a log axis (the summary table shows it at 0%)
                xy = [(100 * summary[k]["remaining"], 100 * summary[k]["layers"][lay]) for k in pts
                      if summary[k]["layers"].get(lay, 0) > 0]
                if not xy:
                    continue
                if mask == "lottery":
                    label = lay if named or i in (0, len(layers) - 1) else None
                    ax.plot(*zip(*xy), "-", color=colours[i], marker="o", ms=2.5, lw=1.2, label=label)
                else:
                    label = f"{mask} mask, every layer" if i == 0 else None
                    ax.plot(*zip(*xy), ":" if mask == "random_adjusted" else "--", color=colours[i], lw=0.8, label=label)
        percent_axis(ax, [100 * summary[k]["remaining"] for k in keys])
        ax.invert_xaxis()
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: percent(v)))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("remaining weights (%)")
        ax.set_ylabel("weights kept in the layer (%, mean over replicates)")
        title = f"{obj}: where the masks keep their weights" + ("" if named else f" ({len(layers)} layers)")
        ax.set_title(textwrap.fill(title, 60), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    thin_labels(fig)
    save_png(fig, path)
    return fig
