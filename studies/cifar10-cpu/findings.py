"""The study's report turned into the findings table: each claim of the paper (F1-F6, F8 of the project's notes on Caron et al. 2020),
Hubens et al.'s (from the caltech-pretrained report) and the rewind point, with the numbers that
decide it and a verdict.

Usage: python studies/cifar10-cpu/findings.py REPORT [--caltech CALTECH_REPORT]
Reads REPORT/results.csv (sslprune report), REPORT/natural_sparsity.csv (sslprune sparsity) and
REPORT/stability.csv (sslprune report, eval stability) where present, and CALTECH_REPORT/results.csv
(its arms as caltech-pretrained/compare.py's arm(), configs from CALTECH_REPORT/../runs); writes
REPORT/findings.md and prints its path. An arm is an experiment named by this study's specs
(labels/rotation/rewind/semi/labels-10pct.toml beside this file, through sslprune.sweep.load_spec): the objective
column of results.csv changes with which other experiments a report holds ('labels (rewind 1ep)').

VERDICT RULES (fixed before any data was seen; applied mechanically)
- A comparison A - B at one level pairs replicates by number, only those present in both arms;
  d = mean of the differences, s.e. = sample std / sqrt(n); arm means are over the same replicates.
- beyond noise: n >= 2 and |d| > 2 s.e.      within +-T: n >= 2 and |d| + 2 s.e. <= T (the interval
  d +- 2 s.e. inside [-T, T]).  T = 0.02 (2 accuracy points).  "positive": d > 0 beyond noise holds,
  d < 0 beyond noise fails, else inconclusive ("negative": the same with the sign turned).
- Compared levels: 10, 13 and 15 where both arms have them (remaining from the data). No compared
  level, or an arm absent: missing. (Said beside the numbers, added after the data was in, changing
  no verdict: which of 10, 13, 15 were left out, and replicates one arm has and the other lacks.)
- Parts and levels combine: any fails -> fails; else any missing -> missing; else all hold -> holds;
  else inconclusive. holds = "reproduced", fails = "not reproduced", missing = "not tested".
- F1 (retrain, test_acc): (a) rotation/reinit - labels/reinit at each compared level: within +-T
  holds; beyond noise and |d| > T fails; else inconclusive. (b) labels/reinit - random and
  rotation/reinit - random (reset 'random' of the labels experiment) positive at each level.
  (c) per objective, gap = reinit - random per replicate; gap(deepest compared level) - gap(10)
  positive (missing without level 10 and a deeper one).
- F2: labels/rewind - labels/reinit (retrain) positive at each compared level.
- F3: per level, boost = rewind - reinit (retrain) per replicate, excess = rotation's boost - labels'.
  holds if rotation's boost is within +-T, or excess is negative beyond noise; fails if rotation's
  boost is beyond noise with d > T and excess is not negative beyond noise; else inconclusive.
- F4: natural_sparsity.csv, layer 'total', level 0, the threshold nearest float32 machine epsilon
  (2^-23) within a factor 2; per objective (labels, rotation) the mean fraction over replicates:
  >= 0.5 holds (n >= 2, as everywhere else: added after the data, which gives 0.00), < 0.5 fails; the verdict combines the objectives present (the absent are named;
  none present: not tested).
- F5: one verdict per probe dataset of the rotation experiment (eval 'probe ...'; metric
  test_mean_class_acc, else test_acc). (a) level 10 - level 0: holds if n >= 2 and d - 2 s.e. >= -T;
  fails if beyond noise and d < -T; else inconclusive. (b) deepest of levels 13, 15 - level 10
  negative. The labels experiment's probe is shown, not judged.
- F6 (added before its data existed): per objective (labels, rotation), this study's masks fine-tuned
  on the Caltech-101 subset (eval 'transfer caltech101-subset', reset 'finetune [...]') minus
  caltech-pretrained's 'pre-trained on CIFAR-10 by <objective>, rewind to it' (pruned during
  transfer), test_mean_class_acc, positive at the compared levels (the caltech arm stops at 10).
  Level 0, where both arms are the same dense fine-tuning, is shown, not judged. No --caltech: not
  tested.
- F8: one verdict per semi-supervised arm (semi.toml's s4l, labels-10pct.toml's labels, 10% of the labels): retrain/rewind at level 10
  minus rotation/rewind at level 10, positive. The mean over levels 1-10 per replicate (replicates
  with all of them) is shown, not judged.
- Hubens et al.: one verdict per pre-trained arm, minus 'from scratch, rewind 1ep' ('rewind 0it' if
  that is absent, and said), test_mean_class_acc, positive at the deepest level both have and at the
  level whose remaining is nearest 10%. No --caltech or no rows: not tested.
- The rewind point: no verdict; the numbers (n = 1), and for each objective and level the earliest
  rewind point with instability <= 0.02 (Frankle et al. 2020 call a ticket stable there).
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path

from sslprune.sweep import load_spec

HERE = Path(__file__).resolve().parent
LEVELS, T, STABLE, EPS = (10, 13, 15), 0.02, 0.02, 2.0 ** -23
VERDICT = {"holds": "reproduced", "fails": "not reproduced", "missing": "not tested", "inconclusive": "inconclusive"}


def _compare():
    """studies/caltech-pretrained/compare.py (studies/ is no package): its arm() names the arms its table shows."""
    spec = importlib.util.spec_from_file_location("caltech_compare", HERE.parent / "caltech-pretrained" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COMPARE = _compare()
CALTECH_METRIC = COMPARE.METRIC  # mean per-class accuracy: Caltech-101's test split is unbalanced


def specs() -> dict:
    """{spec name: load_spec(...)}: this study's specs, which name every arm's experiment."""
    return {n: load_spec(HERE / f"{n}.toml") for n in ("labels", "rotation", "rewind", "semi", "labels-10pct")}


def study_experiments(sp: dict) -> dict:
    """Arm key -> experiment name: 'labels', 'rotation', 's4l 10%', 'labels 10%', ('rewind', task, point)."""
    out = {"labels": sp["labels"].experiments[0].name(), "rotation": sp["rotation"].experiments[0].name()}
    out |= {f"{e.task.task} {e.task.label_fraction:.0%}": e.name()
            for e in (*sp["semi"].experiments, *sp["labels-10pct"].experiments)}
    return out | {("rewind", e.task.task, e.prune.rewind): e.name() for e in sp["rewind"].experiments}


# -- the rules of the docstring, on a paired difference s = (mean, s.e., n) ----------------------------
def ms(vals) -> tuple[float, float, int]:
    vals = list(vals)
    n = len(vals)
    m = sum(vals) / n if n else math.nan
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1) / n) if n > 1 else math.nan, n


def beyond(s) -> bool:
    return s[2] >= 2 and abs(s[0]) > 2 * s[1]


def within(s) -> bool:
    return s[2] >= 2 and abs(s[0]) + 2 * s[1] <= T


def positive(s) -> str:
    return "inconclusive" if not beyond(s) else "holds" if s[0] > 0 else "fails"


def negative(s) -> str:
    return positive((-s[0], s[1], s[2]))


def equivalent(s) -> str:  # F1 (a)
    return "holds" if within(s) else "fails" if beyond(s) and abs(s[0]) > T else "inconclusive"


def not_below(s) -> str:  # F5 (a)
    return "holds" if s[2] >= 2 and s[0] - 2 * s[1] >= -T else "fails" if beyond(s) and s[0] < -T else "inconclusive"


def combine(statuses) -> str:
    statuses = list(statuses)
    return next((s for s in ("fails", "missing") if s in statuses), None) or (
        "holds" if statuses and all(s == "holds" for s in statuses) else "inconclusive")


def fmt(s) -> str:
    return "-" if not s[2] else f"{s[0]:.4f}" + (f" ± {s[1]:.4f}" if s[2] > 1 else "")


def fmt_d(s) -> str:
    return "no paired replicates" if not s[2] else f"{s[0]:+.4f}" + (f" ± {s[1]:.4f}" if s[2] > 1 else "") + f" (n={s[2]})"


def sub(x: dict, y: dict) -> dict:
    return {r: x[r] - y[r] for r in x if r in y}


# -- data -----------------------------------------------------------------------------------------------
def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def arm(label, exp, ev="retrain", reset="reinit", metric="test_acc"):
    """(label, results key, where it comes from): what a comparison names, finds, and says is missing."""
    return label, (exp, ev, reset, metric), f"{exp}: {ev} {reset}"


class Results:
    """results.csv indexed by key(row): key -> level -> {replicate: value}, and each level's remaining."""

    def __init__(self, rows, key):
        self.cells, self.rem = defaultdict(lambda: defaultdict(dict)), defaultdict(list)
        for r in rows:
            if (k := key(r)) is not None:
                self.cells[k][int(r["level"])][int(r["replicate"])] = float(r["value"])
                self.rem[(k, int(r["level"]))].append(float(r["remaining"]))

    def __or__(self, other: Results) -> Results:
        """Both reports' cells (their keys do not collide: tuples here, arm names in caltech's)."""
        out = Results([], None)
        out.cells.update(self.cells | other.cells)
        out.rem.update(self.rem | other.rem)
        return out

    def get(self, a, level) -> dict:
        return self.cells.get(a[1], {}).get(level, {})

    def fraction(self, a, level) -> float:
        r = self.rem.get((a[1], level))
        return sum(r) / len(r) if r else math.nan

    def remaining(self, a, level) -> str:
        return "-" if math.isnan(self.fraction(a, level)) else f"{self.fraction(a, level):.1%}"

    def levels(self, *arms, among=LEVELS) -> list[int]:
        """The levels of `among` where every arm has a replicate in common."""
        return [lv for lv in among if set.intersection(*(set(self.get(a, lv)) for a in arms))]


class Finding:
    """One row of the table: its comparisons (lines), parts with a status each, and what is missing."""

    def __init__(self, name, claim, what):
        self.name, self.claim, self.what, self.note = name, claim, what, ""
        self.lines, self.parts, self.missing, self.levels, self.ns = [], [], [], {}, set()
        self.left_out = set()   # levels and replicates a comparison could not pair: said, never silent

    def compare(self, res, a, b, rule, levels=None, tag="") -> str:
        """A - B at each level (default: the compared levels both have), one line and status each."""
        if levels is None:
            levels = res.levels(a, b)
            if left := [lv for lv in LEVELS if lv not in levels]:
                self.left_out.add(f"L{'/L'.join(map(str, left))} of {a[0]} vs {b[0]} (an arm has no replicate there)")
        if not levels:
            return self.absent(res, (a, b), f"{a[0]} and {b[0]}")
        return combine([self.judge(f"{tag}L{lv}: {a[0]}", res.get(a, lv), b[0], res.get(b, lv), rule, lv,
                                   res.remaining(a, lv)) for lv in levels])

    def absent(self, res, arms, together) -> str:
        """No compared level: the arms with no rows at all are named, else the arms `together`."""
        self.missing += [a[2] for a in arms if not res.cells.get(a[1])] or [f"{together} at {LEVELS}"]
        return "missing"

    def judge(self, la, x, lb, y, rule, lv, rem) -> str:
        """x - y ({replicate: value} each) paired by replicate, judged by rule, written as one line."""
        reps = sorted(x.keys() & y.keys())
        d = ms(x[r] - y[r] for r in reps)
        for name, only in ((la.split(": ")[-1], x.keys() - y.keys()), (lb, y.keys() - x.keys())):
            if only:
                self.left_out.add(f"L{lv} {name} replicate(s) {sorted(only)} (unpaired)")
        self.levels[lv], self.ns = rem, self.ns | {d[2]}
        self.lines.append(f"{la} {fmt(ms(x[r] for r in reps))} vs {lb} {fmt(ms(y[r] for r in reps))}, "
                          f"diff {fmt_d(d)} → {rule(d)}")
        return rule(d)

    def verdict(self) -> str:
        return VERDICT[combine(s for _, s in self.parts)] if self.parts else "not tested"

    def compared(self) -> str:
        lv = ", ".join(f"L{k} ({v})" for k, v in sorted(self.levels.items()))
        n = f"; n = {min(self.ns)}" + (f"-{max(self.ns)}" if len(self.ns) > 1 else "") if self.ns else ""
        return f"{self.what}{'; ' + lv if lv else ''}{n}"

    def paragraph(self) -> str:
        v = self.verdict()
        why = {"reproduced": f"every part holds ({len(self.lines)} line{'s' if len(self.lines) > 1 else ''} of numbers)", "not reproduced": "a part fails",
               "not tested": "data is missing", "inconclusive": "nothing fails, but not every part holds "
               "(n < 2, or differences within noise)"}[v]
        key = {"not reproduced": "fails", "inconclusive": "inconclusive"}.get(v)  # the comparisons that decided it
        decisive = [line.rsplit(" → ", 1)[0] for line in self.lines if key and line.endswith(f"→ {key}")]
        parts = "".join(f"{n}: {s}; " for n, s in self.parts).removesuffix("; ")
        miss = f" Missing: {'; '.join(dict.fromkeys(self.missing))}." if self.missing else ""
        miss += f" Not compared: {'; '.join(sorted(self.left_out))}." if self.left_out else ""
        return (f"**{self.name}: {v}.** {parts + '. ' if parts else ''}Verdict: {why}"
                f"{': ' + '; '.join(decisive) if decisive else ''}.{miss} {self.note}").strip()


# -- findings -------------------------------------------------------------------------------------------
def f1(res, E) -> Finding:
    f = Finding("F1", "SSL masks re-trained from re-init ≈ label masks, both well above random pruning; "
                "the gap to random widens below ~5%", "retrain, test_acc (class accuracy on labels)")
    rot, lab = arm("rotation/reinit", E["rotation"]), arm("labels/reinit", E["labels"])
    rnd = arm("random", E["labels"], reset="random")
    f.parts.append(("(a) rotation ≈ labels (±2 points)", f.compare(res, rot, lab, equivalent, tag="(a) ")))
    f.parts.append(("(b) above random", combine([f.compare(res, x, rnd, positive, tag="(b) ") for x in (lab, rot)])))
    f.parts.append(("(c) gap to random widens", combine([widening(f, res, x, rnd) for x in (lab, rot)])))
    return f


def widening(f, res, x, rnd) -> str:
    """F1 (c): gap = x - random per replicate; gap(deepest compared level) - gap(10), positive."""
    levels = res.levels(x, rnd)
    if 10 not in levels or levels[-1] == 10:
        f.missing.append(f"{x[0]} and random at level 10 and a deeper level")
        return "missing"
    gap = {lv: sub(res.get(x, lv), res.get(rnd, lv)) for lv in (10, levels[-1])}
    d = ms(sub(gap[levels[-1]], gap[10]).values())
    f.lines.append(f"(c) {x[0]} - random: L{levels[-1]} {fmt(ms(gap[levels[-1]].values()))}, L10 "
                   f"{fmt(ms(gap[10].values()))}, widening {fmt_d(d)} → {positive(d)}")
    return positive(d)


def f2(res, E) -> Finding:
    f = Finding("F2", "label pruning: winning tickets (rewind) beat random re-init", "retrain, test_acc")
    rewind, reinit = arm("labels/rewind", E["labels"], reset="rewind"), arm("labels/reinit", E["labels"])
    f.parts.append(("rewind > reinit", f.compare(res, rewind, reinit, positive)))
    return f


def f3(res, E) -> Finding:
    f = Finding("F3", "RotNet pruning: winning tickets give little or no boost over re-init",
                "retrain, test_acc; boost = rewind - reinit, excess = rotation's boost - labels'")
    arms = {(o, r): arm(f"{o}/{r}", E[o], reset=r) for o in ("labels", "rotation") for r in ("rewind", "reinit")}
    levels, statuses = res.levels(*arms.values()), []   # the excess needs labels' boost too
    if not levels:
        f.parts.append(("little or no boost", f.absent(res, arms.values(), "the four arms")))
        return f
    for lv in levels:
        boost = {o: sub(res.get(arms[o, "rewind"], lv), res.get(arms[o, "reinit"], lv)) for o in ("labels", "rotation")}
        b, x = ms(boost["rotation"].values()), ms(sub(boost["rotation"], boost["labels"]).values())
        statuses.append("holds" if within(b) or (beyond(x) and x[0] < 0) else
                        "fails" if beyond(b) and b[0] > T else "inconclusive")
        f.levels[lv], f.ns = res.remaining(arms["rotation", "rewind"], lv), f.ns | {b[2]}
        f.lines.append(f"L{lv}: boost rotation {fmt_d(b)}, labels {fmt_d(ms(boost['labels'].values()))}, "
                       f"excess {fmt_d(x)} → {statuses[-1]}")
    f.parts.append(("little or no boost", combine(statuses)))
    return f


def f4(report: Path, E) -> Finding:
    f = Finding("F4", "deep nets trained on CIFAR-10 with Adam are 80-85% naturally sparse",
                "natural_sparsity.csv, level 0, all prunable weights")
    f.note = "The model here is a 3-layer convnet (93k prunable weights), not a deep net."
    path = report / "natural_sparsity.csv"
    rows = [r for r in read_csv(path) if r["layer"] == "total" and r["level"] == "0"] if path.exists() else []
    ts = sorted({float(r["threshold"]) for r in rows}, key=lambda t: abs(math.log(t / EPS)) if t > 0 else math.inf)
    if not ts or not 0.5 <= ts[0] / EPS <= 2:
        f.missing.append(f"{path.name} with a threshold near machine epsilon ({EPS:.3g})")
        return f
    f.what += f", |w| <= {ts[0]:.3g} (machine epsilon)"
    for obj in ("labels", "rotation"):
        s = ms(float(r["fraction"]) for r in rows if r["experiment"] == E[obj] and float(r["threshold"]) == ts[0])
        if not s[2]:
            f.missing.append(f"{E[obj]} level 0 in {path.name}")
            continue
        f.ns |= {s[2]}
        f.parts.append((f"{obj} >= 0.5", "fails" if s[0] < 0.5 else "holds" if s[2] >= 2 else "inconclusive"))
        f.lines.append(f"{obj}: fraction {fmt(s)} (n={s[2]}) → {f.parts[-1][1]}")
    return f


def probe_evals(res, exp) -> dict:
    """{probe dataset: (eval, metric)} of an experiment: mean per-class accuracy where measured."""
    out = {}
    for e, ev, _, metric in res.cells:
        data = ev.removeprefix("probe ").split(" [")[0]
        if e == exp and ev.startswith("probe") and (metric == "test_mean_class_acc" or metric == "test_acc" and data not in out):
            out[data] = (ev, metric)
    return out


def f5(res, E) -> list[Finding]:
    rot_probes, lab_probes, out = probe_evals(res, E["rotation"]), probe_evals(res, E["labels"]), []
    for data in sorted(rot_probes.keys() | lab_probes.keys()) or ["(any dataset)"]:
        f = Finding(f"F5 ({data})", "linear probes of pruned SSL features hold to ~90% pruned, then drop "
                    "sharply below ~5% remaining", f"probe on {data}, rotation experiment")
        if data not in rot_probes:
            f.missing.append(f"{E['rotation']}: probe rows on {data}")
            f.parts.append(("probe", "missing"))
        else:
            ev, metric = rot_probes[data]
            f.what += f", {metric}"
            a = arm("rotation", E["rotation"], ev, "rewind", metric)
            deep = next((lv for lv in (15, 13) if res.get(a, lv)), 15)
            f.parts.append(("(a) holds at L10 vs L0", across(f, res, a, 10, 0, not_below, "(a) ")))
            f.parts.append(("(b) drops below L10", across(f, res, a, deep, 10, negative, "(b) ")))
        if data in lab_probes:
            ev, metric = lab_probes[data]
            a = arm("", E["labels"], ev, "rewind", metric)
            lab = {lv: ms(res.get(a, lv).values()) for lv in (0, 10, 13, 15)}
            f.lines.append("labels' probe (not judged): " + ", ".join(f"L{lv} {fmt(s)}" for lv, s in lab.items() if s[2]))
        out.append(f)
    return out


def across(f, res, a, lv, base, rule, tag) -> str:
    """One arm, level lv - level base, paired by replicate (F5)."""
    x, y = res.get(a, lv), res.get(a, base)
    if not x.keys() & y.keys():
        f.missing.append(f"{a[2]} at levels {base} and {lv}")
        return "missing"
    f.levels[base] = res.remaining(a, base)
    return f.judge(f"{tag}L{lv}", x, f"L{base}", y, rule, lv, res.remaining(a, lv))


def f8(res, E) -> list[Finding]:
    rot, out = arm("rotation/rewind", E["rotation"], reset="rewind"), []
    for key, name in (("s4l 10%", "S4L-rotation, 10% of labels"), ("labels 10%", "labels alone, 10% of labels")):
        f = Finding(f"F8 ({name})", "S4L tickets beat RotNet's; 10% labels alone also beat RotNet",
                    "retrain/rewind, test_acc, level 10 vs rotation/rewind")
        x = arm(f"{key}/rewind", E[key], reset="rewind")
        f.parts.append(("better than rotation at L10", f.compare(res, x, rot, positive, levels=res.levels(x, rot, among=(10,)))))
        mean = {a[0]: {r: sum(res.get(a, lv)[r] for lv in range(1, 11)) / 10 for r in res.get(a, 10)
                       if all(r in res.get(a, lv) for lv in range(1, 11))} for a in (x, rot)}
        f.lines.append(f"mean over L1-10 (not judged): diff {fmt_d(ms(sub(mean[x[0]], mean[rot[0]]).values()))}")
        out.append(f)
    return out


def caltech_results(caltech: Path | None):
    """caltech-pretrained's results.csv keyed by its arms (compare.py's arm()), or None without it."""
    if caltech is None or not (caltech / "results.csv").exists():
        return None
    rows, runs = read_csv(caltech / "results.csv"), caltech.parent / "runs"
    configs = {d.name: json.loads((d / "config.json").read_text())["config"] for d in runs.iterdir()
               if (d / "config.json").exists()} if runs.is_dir() else {}
    for r in rows:  # no runs folder beside the report: a from-scratch rewind point from the objective name
        point = re.search(r"rewind (\w+)", r["objective"])
        configs.setdefault(r["experiment"], {"model": {"pretrained": ""}, "prune": {"rewind": point[1] if point else "?"}})
    return Results(rows, lambda r: COMPARE.arm(r, configs) if r["metric"] == CALTECH_METRIC else None)


def hubens(cres) -> list[Finding]:
    claim = "pre-trained networks prune better than the same network trained from scratch"
    if cres is None:
        f = Finding("Hubens et al.", claim, f"caltech-pretrained report, {CALTECH_METRIC}")
        f.missing.append("the caltech-pretrained report (--caltech REPORT with results.csv)")
        return [f]
    arms = {k: (k, k, k) for k in cres.cells}
    base = arms.get("from scratch, rewind 1ep") or arms.get("from scratch, rewind 0it")
    out = []
    for name in sorted(k for k in arms if k.startswith("pre-trained")) or ["pre-trained"]:
        f = Finding(f"Hubens et al. ({name})", claim, f"{name} vs {base[0] if base else 'from scratch'}, {CALTECH_METRIC}")
        if base is None or name not in arms:
            f.missing.append("from-scratch arm (rewind 1ep or 0it)" if base is None else f"arm {name}")
            f.parts.append(("pre-trained better", "missing"))
        else:
            common = cres.levels(arms[name], base, among=sorted(cres.cells[name]))
            near10 = min(common, key=lambda lv: abs(cres.fraction(base, lv) - 0.1), default=None)
            f.parts.append(("pre-trained better", f.compare(cres, arms[name], base, positive,
                                                            levels=sorted({common[-1], near10}) if common else [])))
            f.note = "" if base[0].endswith("1ep") else "The from-scratch arm rewound to 1 epoch is absent: rewind 0it used."
        out.append(f)
    return out


def f6(res, cres, E) -> list[Finding]:
    out = []
    for obj in ("labels", "rotation"):
        f = Finding(f"F6 ({obj})", "fine-tuning an already pruned pre-trained network beats pruning during transfer",
                    f"Caltech-101, {CALTECH_METRIC}: {obj} masks fine-tuned (this study) vs pruned during "
                    "transfer (caltech-pretrained)")
        tuned = next((arm("fine-tuned", *k[:3], metric=k[3]) for k in res.cells if k[0] == E[obj] and
                      k[1] == "transfer caltech101-subset" and k[2].startswith("finetune") and k[3] == CALTECH_METRIC),
                     None)
        during = f"pre-trained on CIFAR-10 by {obj}, rewind to it"
        if tuned is None or cres is None or during not in cres.cells:
            f.missing += ([f"{E[obj]}: transfer caltech101-subset finetune"] if tuned is None else []) + \
                         (["the caltech-pretrained report (--caltech)"] if cres is None else
                          [f"caltech-pretrained arm {during}"] if during not in cres.cells else [])
            f.parts.append(("fine-tuned better", "missing"))
        else:
            both, during = res | cres, ("pruned during transfer", during, during)
            f.parts.append(("fine-tuned better", f.compare(both, tuned, during, positive)))
            f.lines.append("L0, the same dense fine-tuning (not judged): fine-tuned "
                           f"{fmt(ms(both.get(tuned, 0).values()))}, pruned during transfer {fmt(ms(both.get(during, 0).values()))}")
        out.append(f)
    return out


def rewind_section(res, report: Path, sp, E) -> list[str]:
    """Instability and re-trained accuracy per objective x rewind point x level: numbers, no verdict."""
    path = report / "stability.csv"
    st = {(r["experiment"], int(r["level"])): r for r in read_csv(path) if r["replicate"] == "1"} if path.exists() else {}
    lines = ["## The rewind point (no paper claim; n = 1)", "",
             "Does a self-supervised ticket become stable later than a label ticket? Instability "
             "(stability.csv: max test error on the path between two copies minus their mean, the error of each "
             "objective's own task: class error for labels, rotation error for RotNet) and the mask "
             "re-trained on labels from that rewind point (retrain/rewind, test_acc), replicate 1.", "",
             "| objective | rewind | level | remaining | instability | re-trained accuracy |", "|---|---|---|---|---|---|"]
    says, points = [], list(dict.fromkeys(e.prune.rewind for e in sp["rewind"].experiments))  # spec order
    for task in ("labels", "rotation"):
        for lv in sp["rewind"].evaluations["stability"][0]["level"]:
            for point in points:
                a = arm("", E[("rewind", task, point)], reset="rewind")
                s = st.get((a[1][0], lv), {})
                acc = res.get(a, lv).get(1, s.get("retrained_acc") or None)
                rem = f"{float(s['remaining']):.1%}" if s else res.remaining(a, lv)
                inst = f"{float(s['instability']):.4f}" if s else "-"
                lines.append(f"| {task} | {point} | {lv} | {rem} | {inst} | {'-' if acc is None else f'{float(acc):.4f}'} |")
            measured = [p for p in points if (E[("rewind", task, p)], lv) in st]
            stable = [p for p in measured if float(st[(E[("rewind", task, p)], lv)]["instability"]) <= STABLE]
            says.append(f"{task} L{lv}: " + (f"earliest stable rewind point {stable[0]} (of {', '.join(measured)})" if stable
                                              else f"none stable of {', '.join(measured)}" if measured else "not measured"))
    return lines + ["", f"What the data says (instability <= {STABLE}, n = 1): " + "; ".join(says) + ".", ""]


def header(args, sp, E, rows) -> list[str]:
    """What data, which report, and how many replicates each experiment has, to which level."""
    e0 = sp["labels"].experiments[0]
    lines = ["# Findings of the cifar10-cpu study", "",
             # paths relative to findings.md, which sits in args.report: the committed file names no machine's folders
             f"From `results.csv`" + (f" and `{os.path.relpath(args.caltech / 'results.csv', args.report)}`" if args.caltech else "")
             + f". Data: {Path(str(sp['labels'].data_root)).name}, {e0.data.train_per_class} train / "
             f"{e0.data.test_per_class} test images per class; model {e0.model.model}, {e0.train.optimizer} "
             f"{e0.train.epochs} epochs. Rules: findings.py's docstring; numbers are mean ± s.e. over the replicates "
             "paired in each comparison. With 2-3 replicates, 2 s.e. is a loose bar (a paired t-test at 95% "
             "needs 4.3 s.e. at n = 3, 12.7 at n = 2): a verdict that rests on one comparison is weak evidence, "
             "and the table gives every number behind it.", "", "Replicates per experiment (deepest level of its lottery and of its "
             "re-trainings on labels):", ""]
    named = {}
    for key, exp in E.items():  # the rewind spec's 1ep experiments are labels.toml's and rotation.toml's
        named.setdefault(exp, " ".join(key) if isinstance(key, tuple) else key)
    for exp, key in named.items():
        deepest = defaultdict(dict)  # replicate -> {'task' | 'retrain': deepest level}
        for r in (r for r in rows if r["experiment"] == exp and r["eval"] in ("task", "retrain")):
            d = deepest[int(r["replicate"])]
            d[r["eval"]] = max(d.get(r["eval"], 0), int(r["level"]))
        have = "; ".join(f"replicate {k}: " + ", ".join(f"{'lottery' if ev == 'task' else 'retrain'} to L{lv}"
                                                       for ev, lv in sorted(d.items(), reverse=True))
                         for k, d in sorted(deepest.items())) or "no rows"
        lines.append(f"- {key} (`{exp}`): {have} (n={len(deepest)})")
    return lines


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("report", type=Path)
    p.add_argument("--caltech", type=Path)
    args = p.parse_args(argv)
    if not (args.report / "results.csv").exists():
        raise SystemExit(f"{args.report}: no results.csv; run 'sslprune report RUNS --out {args.report}' first")
    sp = specs()
    E = study_experiments(sp)
    rows = read_csv(args.report / "results.csv")
    res = Results(rows, lambda r: (r["experiment"], r["eval"], r["reset"], r["metric"]))
    cres = caltech_results(args.caltech)
    findings = [f1(res, E), f2(res, E), f3(res, E), f4(args.report, E), *f5(res, E), *f6(res, cres, E), *f8(res, E),
                *hubens(cres)]
    lines = header(args, sp, E, rows)
    lines += ["", "| finding | the paper's claim | what is compared | numbers | verdict |", "|---|---|---|---|---|"]
    for f in findings:
        cells = [f.name, f.claim, f.compared(), "<br>".join(f.lines) or "-", f.verdict()]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")  # '|w|' must not split a cell
    lines += ["", *[f.paragraph() + "\n" for f in findings], *rewind_section(res, args.report, sp, E)]
    out = args.report / "findings.md"
    out.write_text("\n".join(lines))
    print(out)
    return out


if __name__ == "__main__":
    main()
