"""Runs trained with --budget (VICReg-Dual, Krishna et al. 2023) in `sslprune report`: their Table 1
(the dense baseline; the dense and the gated path per budget, probe accuracy and MACs reduction),
accuracy against realised MACs, and their "conditional channels" figure as a table (per block, the
fractions of gated channels always open, never open and input-dependent over the probe's test images).

The baseline of a gated experiment is an experiment in the same report with the same settings
except --budget 0: plain VICReg trained for the same epochs. Accuracies are linear probes: of the
dense path (`sslprune eval probe`) and of the gated path (`--stage gated`), on the same data.
Realised MACs and the gates per block are the gated path's on the gated probe's test images (no
augmentation; the probe records them).
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

from . import layout
from .lottery import load_experiment
from .probe import GATED

DUAL_COLUMNS = ("experiment", "budget", "replicate", "probe", "path", "test_acc", "macs")


def collect_dual(exp_dirs: list[Path]) -> tuple[list[dict], list[dict]]:
    """(rows, blocks): a row per probe of a level-0 network of a gated experiment or of its
    baseline, with the realised MACs of its path on the probe's test images; a row per block of
    each gated-path probe (its gates on those images)."""
    exps = {Path(d): load_experiment(d)[0] for d in exp_dirs}
    gated = {d: e for d, e in exps.items() if e.task.budget > 0}
    plain = {_without_budget(e): d for d, e in exps.items() if e.task.budget == 0}
    rows, blocks = [], []
    for d, exp in exps.items():
        if d not in gated and not any(plain.get(_without_budget(g)) == d for g in gated.values()):
            continue   # neither gated nor a gated experiment's baseline
        for replicate, level, ldir in layout.levels(d):
            if level:
                continue
            for e in layout.evaluations(ldir):
                if e.kind != "probe" or not layout.is_done(e.path) or e.stage not in (None, GATED):
                    continue
                done = layout.load_json(e.path / layout.DONE)
                gates = done.get("gates")
                if e.stage == GATED and gates is None:
                    continue   # probed before probes recorded the gates: run it again to report it
                probe = f"{e.data} [{e.digest}]"
                rows.append(dict(experiment=d.name, budget=exp.task.budget, replicate=replicate, probe=probe,
                                 path="gated" if gates else "dense", test_acc=done["test_acc"],
                                 macs=gates["macs"] if gates else 1.0))
                for b in range(1, 1 + sum(k.startswith("always_open_") for k in gates or {})):
                    always, never = gates[f"always_open_{b}"], gates[f"never_open_{b}"]
                    blocks.append(dict(budget=exp.task.budget, probe=probe, replicate=replicate, block=b,
                                       open=gates[f"open_{b}"], always=always, never=never,
                                       conditional=1 - always - never))
    return rows, blocks


def _without_budget(exp):
    return dataclasses.replace(exp, task=dataclasses.replace(exp.task, budget=0.0))


def _mean_se(values: list[float]) -> str:
    """'0.7000 ± 0.0200', or '0.7000' from one seed (the report's own mean and standard error)."""
    from .report import mean_se as stats
    mean, se, n = stats(values)
    return f"{mean:.4f} ± {se:.4f}" if n > 1 else f"{mean:.4f}"


def summary(rows: list[dict]) -> list[dict]:
    """Per probe and budget: the dense and gated paths' accuracies and the gated path's MACs, with n."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["probe"], r["budget"], r["path"])].append(r)
    out = []
    for probe, budget in sorted({(p, b) for p, b, _ in groups}, key=lambda k: (k[0], k[1])):
        dense, gated = groups.get((probe, budget, "dense"), []), groups.get((probe, budget, "gated"), [])
        out.append(dict(probe=probe, budget=budget, dense=[r["test_acc"] for r in dense],
                        gated=[r["test_acc"] for r in gated], macs=[r["macs"] for r in gated]))
    return out


def markdown(rows: list[dict], blocks: list[dict]) -> str:
    if not rows:
        return ""
    lines = ["## Dense and gated paths (VICReg-Dual, Krishna et al. 2023, their Table 1)", "",
             "Linear-probe accuracy of each path (mean ± s.e. over seeds, n each); realised MACs: the gated "
             "path's mean over the probe's test images, as a fraction of the dense network's (gate networks included); "
             "reduction = 1 - realised. Budget 0: plain VICReg, the same epochs.", ""]
    for probe in sorted({s["probe"] for s in summary(rows)}):
        lines += [f"Probe: {probe}", "", "| method | budget t_d | dense path | gated path | realised MACs | MACs reduction | n |",
                  "|---|---|---|---|---|---|---|"]
        for s in (s for s in summary(rows) if s["probe"] == probe):
            if s["budget"] == 0:
                lines.append(f"| VICReg (no gates) | - | {_mean_se(s['dense'])} | - | 1 | 0% | {len(s['dense'])} |")
                continue
            macs = sum(s["macs"]) / len(s["macs"]) if s["macs"] else None
            lines.append(f"| VICReg-Dual | {s['budget']:g} | {_mean_se(s['dense']) if s['dense'] else '-'} | "
                         f"{_mean_se(s['gated']) if s['gated'] else '-'} | {_mean_se(s['macs']) if s['macs'] else '-'} | "
                         f"{f'{1 - macs:.1%}' if macs is not None else '-'} | {max(len(s['dense']), len(s['gated']))} |")
        lines.append("")
    if blocks:
        lines += ["Gated channels per block over the probe's test images (mean over seeds and probes): always open / never open / "
                  "input-dependent (their \"conditional\" channels), and the mean open fraction.", "",
                  "| budget t_d | block | always open | never open | input-dependent | open |", "|---|---|---|---|---|---|"]
        groups = defaultdict(list)
        for b in blocks:
            groups[(b["budget"], b["block"])].append(b)
        for (budget, block), bs in sorted(groups.items()):
            m = {k: sum(b[k] for b in bs) / len(bs) for k in ("always", "never", "conditional", "open")}
            lines.append(f"| {budget:g} | {block} | {m['always']:.1%} | {m['never']:.1%} | {m['conditional']:.1%} | {m['open']:.1%} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Probe accuracy against realised MACs: each budget's gated path, its dense path at 1, the baseline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .figures import save_png

    fig, ax = plt.subplots(figsize=(6, 4))
    for probe in sorted({s["probe"] for s in summary(rows)}):
        items = [s for s in summary(rows) if s["probe"] == probe]
        for key, marker, label in (("gated", "o", "gated path"), ("dense", "s", "dense path")):
            pts = [(sum(s["macs"]) / len(s["macs"]) if key == "gated" else 1.0, s[key], s["budget"])
                   for s in items if s[key] and (s["budget"] > 0) and (key == "dense" or s["macs"])]
            if pts:
                ax.errorbar([p[0] for p in pts], [sum(p[1]) / len(p[1]) for p in pts],
                            yerr=[_se(p[1]) for p in pts], fmt=marker, capsize=3, label=f"{label} ({probe})")
                for x, accs, b in pts:
                    ax.annotate(f"t={b:g}", (x, sum(accs) / len(accs)), fontsize=7, xytext=(3, 3), textcoords="offset points")
        base = [s for s in items if s["budget"] == 0 and s["dense"]]
        if base:
            ax.axhline(sum(base[0]["dense"]) / len(base[0]["dense"]), ls="--", color="grey", label=f"VICReg, no gates ({probe})")
    ax.set_xlabel("MACs per image, fraction of the dense network (realised, probe's test images)")
    ax.set_ylabel("linear-probe accuracy")
    ax.legend(fontsize=7)
    save_png(fig, path)   # closes it


def _se(values: list[float]) -> float:
    from .report import mean_se as stats
    return stats(values)[1] if len(values) > 1 else 0.0
