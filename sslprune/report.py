"""Collect saved results into results.csv, a Markdown summary (mean ± standard error over
replicates, headed by what produced them) and plots of accuracy against remaining weights (log axis;
the paper's Fig. 3), each plot as PNG and as SVG beside it (vector, for papers).

Reads nothing but saved files: config.json, masks and done.json of each step. Per-layer densities
of the masks: report_layers.py (layer_density.csv); the gated study's tables: report_dual.py.

results.csv columns: experiment, objective, reset, replicate, level, remaining, remaining_network,
eval, metric, value, then the cost columns
- experiment:     the experiment directory's name (task_model_dataset_hash): replicates are
                  averaged within one experiment, never across experiments.
- eval 'task':    the lottery run itself, its objective's own metric (Task.metric: labels and
                  s4l: class accuracy, rotation: rotation accuracy, exemplar: positive retrieval
                  in the batch, npid: kNN accuracy); reset is the run's reset.
- eval 'retrain': the mask re-trained on labels; reset rewind | reinit | random | random_adjusted.
- eval 'probe D [h]': a linear probe of the level's trained backbone on dataset D (sslprune eval probe);
                  h names its configuration (two configurations are never averaged together).
- eval 'transfer D': the two arms of transfer to dataset D (Caron et al. 2020, Fig. 2), told apart by
                  reset: 'finetune [h]' (sslprune eval finetune: the level's pruned network fine-tuned
                  on D, mask fixed) and 'pruned during transfer' (a lottery run on D whose --pretrained
                  is the source run: its levels' own test results). objective is the source's.
- remaining:      fraction of prunable weights kept, over the layers being pruned (all of them,
                  unless --layers N restricts pruning to the first N conv layers);
- remaining_network: the same over every prunable weight of the network.
- granularity, params, macs, macs_ratio, speedup_<backend>_b<batch>: the cost of the network the
                  row's mask gives (sslprune eval cost; blank until measured): non-zero conv/linear
                  weights, MACs per image and their ratio to dense, measured speed-ups over dense.
"""
from __future__ import annotations

import csv
import io
import math
import textwrap
from collections import defaultdict
from pathlib import Path

from . import layout, report_dual, report_layers
from .figures import colours, legend, legend_height, percent_axis, save_png, thin_labels
from .errors import UserError
from .lottery import load_experiment
from .models import build_backbone
from .pruning import density, pruned_layers
from .stability import bn_description
from .tasks import TASKS, Task

# cost.json of the row's mask (sslprune eval cost): empty until measured
SPEEDUPS = ("torch_cpu_b1", "torch_cpu_b64", "onnxruntime_b1", "onnxruntime_b64", "torch_cuda_b1", "torch_cuda_b64")
COST_COLUMNS = ["granularity", "params", "macs", "macs_ratio", *(f"speedup_{k}" for k in SPEEDUPS)]
COLUMNS = ["experiment", "objective", "reset", "replicate", "level", "remaining", "remaining_network", "eval",
           "metric", "value", *COST_COLUMNS]
# those a run has (NPID: no test loss; probes: accuracy and mean per-class accuracy)
METRICS = ("test_acc", "train_acc", "test_loss", "test_rotation_acc", "test_mean_class_acc")
# what a metric measures, in words for tables and axes (rows carry it as 'measure', not in results.csv);
# test_acc is filled per run by collect: the objective's own metric (Task.metric) or class accuracy
MEASURES = {"test_mean_class_acc": "mean per-class accuracy", "test_rotation_acc": "rotation accuracy"}


def _flat(exp) -> dict:
    return {k: v for section in exp.to_dict().values() for k, v in section.items()}


def labels(exp_dirs: list[Path], ignore: tuple[str, ...] = ()) -> dict[Path, str]:
    """Each experiment's curve name: its objective label, and where experiments share one, the
    settings that tell them apart, e.g. 'labels (rewind 3ep)' (never averaged as replicates).
    `ignore`: settings a figure puts on an axis instead (the rewind point)."""
    exps = {Path(d).resolve(): load_experiment(d)[0] for d in exp_dirs}
    groups = defaultdict(list)
    for d, exp in exps.items():
        groups[objective_label(exp)].append(d)
    out = {}
    for label, dirs in groups.items():
        flats = {d: _flat(exps[d]) for d in dirs}
        differ = [k for k in flats[dirs[0]] if k not in ignore and len({repr(f[k]) for f in flats.values()}) > 1]
        for d in dirs:
            extra = ", ".join(f"{k.replace('_', ' ')} {flats[d][k]}" for k in differ)
            out[d] = f"{label} ({extra})" if extra else label
    return out


KINDS = ("train", "retrain", "probe", "finetune")   # the order of a level's rows in results.csv


def experiments(exp_dirs: list[Path]) -> list[Path]:
    """Each experiment once (a folder given twice, or directly and through its root, is one).
    Replicates are averaged by experiment name, so two folders of one name (the same settings on
    other data under another root: the data root is not in the name) are refused, not pooled."""
    unique = list(dict.fromkeys(Path(d).resolve() for d in exp_dirs))
    by_name: dict[str, Path] = {}
    for d in unique:
        if by_name.setdefault(d.name, d) != d:
            raise UserError(f"two experiments named {d.name}: {by_name[d.name]} and {d}; their replicates would "
                            f"be averaged as one: report them separately (another --out)")
    return unique


def collect(exp_dirs: list[Path], cache: dict | None = None) -> list[dict]:
    """results.csv's rows. cache: the masks' counts, read once per report (report_layers.mask_counts)."""
    cache = {} if cache is None else cache
    rows = []
    names = labels(exp_dirs)
    for exp_dir in exp_dirs:
        exp, saved = load_experiment(exp_dir)
        layers = pruned_layers(build_backbone(exp), exp.prune.layers)
        objective = names[Path(exp_dir).resolve()]
        own_metric = TASKS.get(exp.task.task, Task).metric  # what test_acc means in the lottery's own runs
        # the lottery's own rows; a run started from another lottery run is pruning during transfer
        # (decided by what config.json recorded, so it holds wherever the source run lives now)
        train_row = (objective, "task", exp.prune.reset)
        if str(saved.get("pretrained_id") or "").startswith("run "):
            source = Path(exp.model.pretrained)
            train_row = (names.get(source.resolve()) or _source_label(source), f"transfer {_data_label(saved)}", TRANSFER_PRUNED)
        for replicate, level, ldir in layout.levels(exp_dir):
            for e in sorted(layout.evaluations(ldir), key=lambda e: KINDS.index(e.kind) if e.kind in KINDS else 9):
                if e.kind == "train":
                    eval_name, reset, curve = train_row[1], train_row[2], train_row[0]
                elif e.kind == "retrain":
                    eval_name, reset, curve = "retrain", e.reset, objective
                elif e.kind == "probe":  # the hash stays: two configurations on one dataset are never averaged
                    eval_name, reset, curve = f"probe {e.data}{' @' + e.stage if e.stage else ''} [{e.digest}]", exp.prune.reset, objective
                elif e.kind == "finetune":
                    eval_name, reset, curve = f"transfer {e.data}", f"finetune [{e.digest}]", objective
                else:
                    continue  # stability: its own table (collect_stability)
                if not layout.is_done(e.path):
                    continue
                done = layout.load_json(e.path / layout.DONE)
                counts = report_layers.mask_counts(e.mask, cache)   # a level's mask read once, checked
                remaining, remaining_network = _share(counts, layers or list(counts)), _share(counts, list(counts))
                cost = _cost(e.mask.parent / layout.COST, exp.prune.granularity)
                # every run but the lottery's own trains on labels (re-training, probes, fine-tuning)
                measures = {**MEASURES, "test_acc": own_metric if e.kind == "train" else "class accuracy"}
                for metric in (m for m in METRICS if done.get(m) is not None):
                    rows.append(dict(experiment=Path(exp_dir).name, objective=curve, reset=reset, replicate=replicate,
                                     level=level, remaining=remaining, remaining_network=remaining_network,
                                     eval=eval_name, metric=metric, measure=measures.get(metric, metric),
                                     value=done[metric], **cost))
    return rows


def _share(counts: dict[str, tuple[int, int]], layers: list[str]) -> float:
    """Kept over total weights of these layers."""
    return sum(counts[n][0] for n in layers) / sum(counts[n][1] for n in layers)


def _cost(path: Path, granularity: str) -> dict:
    """The cost columns of a mask: its cost.json (sslprune eval cost), or blanks."""
    out = dict.fromkeys(COST_COLUMNS, "") | {"granularity": granularity}
    if path.exists():
        c = layout.load_json(path)
        out |= {"params": c["params_nonzero"], "macs": c["macs"], "macs_ratio": c["macs_ratio"],
                **{f"speedup_{k}": v for k, v in c["speedup"].items() if k in SPEEDUPS}}
    return out


def unfinished(exp_dirs: list[Path]) -> list[str]:
    """One line per experiment whose levels (or re-trainings) are not finished: they are left out of
    the report, and a reader should know it."""
    lines = []
    for exp_dir in exp_dirs:
        missing = [str(e.path.relative_to(exp_dir)) for _, _, ldir in layout.levels(exp_dir)
                   for e in layout.evaluations(ldir) if e.kind in ("train", "retrain") and not layout.is_done(e.path)]
        if missing:
            lines.append(f"{Path(exp_dir).name}: {len(missing)} unfinished, left out of the report: "
                         f"{', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}")
    return lines


def mixed_retraining(exp_dirs: list[Path]) -> list[str]:
    """A warning line when the masks re-trained on labels were re-trained under different settings
    (each run's own schedule, or its --retrain-as preset's: retrain.retrain_settings): one
    objective's re-trained curve could then beat another's for its schedule, not its mask."""
    from .retrain import retrain_settings
    settings = defaultdict(list)
    for exp_dir in exp_dirs:
        if any(e.kind == "retrain" for _, _, ldir in layout.levels(exp_dir) for e in layout.evaluations(ldir)):
            cfg, aug = retrain_settings(load_experiment(exp_dir)[0])
            settings[f"{_schedule_text(cfg)}, crop-pad {aug.crop_pad}, flip {aug.flip}"].append(Path(exp_dir).name)
    if len(settings) < 2:
        return []
    return ["masks re-trained on labels under different settings: " +
            "; ".join(f"{', '.join(names)}: {text}" for text, names in settings.items()) +
            ". Compare their re-trained curves with care, or give the runs one --retrain-as preset"]


TRANSFER_PRUNED = "pruned during transfer"
# a curve's line style says how its weights were set (its colour, what found its mask); solid: the
# ticket, a fine-tuning, a probe of the lottery's own network
LINESTYLES = {"reinit": "--", "random": ":", "random_adjusted": "-.", TRANSFER_PRUNED: "--"}


def _data_label(saved: dict) -> str:
    """The dataset an experiment trained on, named as evaluations name it ('caltech101-subset')."""
    name = saved.get("data_name") or Path(saved.get("data_root") or saved["config"]["data"]["dataset"]).name
    return name.split(".")[0]


def _source_label(src: Path) -> str:
    """The objective of the run a transfer started from, or its folder name when it is not here."""
    try:
        return objective_label(load_experiment(src)[0])
    except (UserError, OSError):
        return src.name


def objective_label(exp) -> str:
    """'labels', or with few labels e.g. 'labels 10% of images' / 's4l 10% of classes'; a run
    started from a checkpoint file adds 'from <file>' (pre-trained then pruned, Hubens et al.)."""
    t = exp.task
    label = t.task
    if t.label_fraction and t.label_fraction < 1:
        label = f"{t.task} {t.label_fraction:.0%} of {t.label_split}"
    if exp.prune.granularity == "channel":
        rounded = f", multiples of {exp.prune.channel_round}" if exp.prune.channel_round > 1 else ""
        label = f"{label}, channels ({exp.prune.channel_score}{rounded})"
    if exp.model.pretrained:  # e.g. 'labels from resnet50.pth' or 'rotation from labels_..._<hash> level 0'
        where = layout.locate(Path(exp.model.pretrained))
        source = (f"{where[0].name} level {where[2]}" if where and where[2] is not None
                  else Path(exp.model.pretrained).name)
        label = f"{label} from {source}"
    return label


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard error over replicates per (eval, curve, level, metric). A curve is one
    (objective, reset) of one experiment; it is named by its objective alone when no other
    experiment has a curve of that name in the same evaluation."""
    experiments = defaultdict(set)
    for r in rows:
        experiments[(r["eval"], r["objective"], r["reset"])].add(r["experiment"])
    groups = defaultdict(list)
    for r in rows:
        unique = len(experiments[(r["eval"], r["objective"], r["reset"])]) == 1
        objective = r["objective"] if unique else r["experiment"]
        groups[(r["eval"], objective, r["reset"], r["level"], r["metric"])].append(r)
    out = []
    for (ev, obj, reset, level, metric), rs in sorted(groups.items()):
        mean, se, n = mean_se([r["value"] for r in rs])
        out.append(dict(eval=ev, objective=obj, reset=reset, level=level,
                        remaining=sum(r["remaining"] for r in rs) / n, metric=metric,
                        measure=rs[0].get("measure", metric), mean=mean, se=se, n=n))
    return out


def _sections(summary: list[dict]) -> list[tuple[str, str, str, str, str]]:
    """(eval, metric, measure, title, y-label) of every table and plot panel, in a fixed order. The
    lottery's own rows get one per measure: objectives whose test_acc means different things (class,
    rotation, kNN accuracy) never share a table or an axis."""
    evals = sorted({s["eval"] for s in summary}, key=lambda e: (e != "retrain", e != "task", e))
    out = []
    for ev in evals:
        # probes and transfer: mean per-class accuracy (the measure for unbalanced sets like Caltech-101)
        metric = "test_acc" if ev in ("retrain", "task") else "test_mean_class_acc"
        for measure in sorted({s["measure"] for s in summary if (s["eval"], s["metric"]) == (ev, metric)}):
            if ev == "retrain":
                title, ylabel = "Masks re-trained on labels: test accuracy", f"test {measure}, re-trained on labels"
            elif ev == "task":
                title, ylabel = f"Each objective's own task during pruning: test {measure}", f"test {measure}"
            elif ev.startswith("transfer"):
                data = ev.removeprefix("transfer ")
                title = (f"Transfer to {data}: pruned then fine-tuned (mask fixed) vs {TRANSFER_PRUNED}: "
                         f"mean per-class test accuracy")
                ylabel = f"test {measure} on {data}"
            else:  # 'probe D @layer [hash]': the hash is in the title, the axis needs only the data
                title = f"Linear {ev}: mean per-class test accuracy"
                ylabel = f"linear probe on {ev.removeprefix('probe ').split(' [')[0]}: test {measure}"
            out.append((ev, metric, measure, title, ylabel))
    return out


def _rows(summary: list[dict], ev: str, metric: str, measure: str) -> list[dict]:
    return [s for s in summary if (s["eval"], s["metric"], s["measure"]) == (ev, metric, measure)]


def _value(s: dict, with_n: bool = False) -> str:
    """'0.7000 ± 0.0200', or just '0.7000' from one replicate (no spread to show); with_n adds '(n=3)'."""
    text = f"{s['mean']:.4f} ± {s['se']:.4f}" if s["n"] > 1 else f"{s['mean']:.4f}"
    return f"{text} (n={s['n']})" if with_n else text


def _n_header(ns: set[int]) -> str:
    """Replicates of a column, said once in its header; when levels have different counts (a run
    still going), each cell says its own."""
    return f"n={min(ns)}" if len(ns) == 1 else f"n varies, {min(ns)}-{max(ns)}: see cells"


def markdown(summary: list[dict]) -> str:
    lines = []
    for ev, metric, measure, title, _ in _sections(summary):
        rows = _rows(summary, ev, metric, measure)
        curves = sorted({(s["objective"], s["reset"]) for s in rows})
        levels = sorted({s["level"] for s in rows})
        cell = {(s["objective"], s["reset"], s["level"]): s for s in rows}
        ns = {c: {s["n"] for s in rows if (s["objective"], s["reset"]) == c} for c in curves}
        spread = "mean ± s.e. over replicates" if any(s["n"] > 1 for s in rows) else "one replicate"
        lines += [f"## {title} ({spread})", "",
                  "| level | remaining | " + " | ".join(f"{o} / {r} ({_n_header(ns[(o, r)])})" for o, r in curves) + " |",
                  "|---|---|" + "---|" * len(curves)]
        for level in levels:
            # one density for the row when every curve has it (to the printed precision); else each
            # cell says its own (channel against weight runs, another --fraction or --layers)
            here = [cell[(o, r, level)] for o, r in curves if (o, r, level) in cell]
            shared = len({f"{s['remaining']:.2%}" for s in here}) == 1
            rem = f"{here[0]['remaining']:.2%}" if shared else "see cells"
            vals = ["" if (o, r, level) not in cell else
                    _value(cell[(o, r, level)], len(ns[(o, r)]) > 1) +
                    ("" if shared else f" at {cell[(o, r, level)]['remaining']:.2%}")
                    for o, r in curves]
            lines.append(f"| {level} | {rem} | " + " | ".join(vals) + " |")
        lines.append("")
    return "\n".join(lines)


def provenance(exp_dirs: list[Path]) -> str:
    """Which experiments produced the numbers, as each one's config.json recorded them when it was
    created: objective, model, data, schedule, pruning and the git revision of the code."""
    lines = ["## Experiments", "",
             "From each experiment's config.json, which also keeps every command run on it and the package "
             "versions. The revision is the code that created the experiment; later steps (retrain, eval) "
             "record their command there, not their revision. Compute: the sweep ledger's time of its finished "
             "steps, summed over workers (and their CPU time where logged); '-' when no sweep ran it.", "",
             "| experiment | objective | model | data | training | pruning | code (git) | compute |",
             "|---|---|---|---|---|---|---|---|"]
    from . import workers  # the ledger's reader; at import time it would be circular (workers -> sweep -> evaluations)
    tasks = set()
    for exp_dir in exp_dirs:
        exp, saved = load_experiment(exp_dir)
        tasks.add(exp.task.task)
        cells = [Path(exp_dir).name, objective_label(exp), exp.model.model, _data_text(exp, saved),
                 _schedule_text(exp.train), _pruning_text(exp.prune), _git_text(saved.get("git")),
                 _cost_text(workers.cost(Path(exp_dir).parent, Path(exp_dir).name))]
        lines.append("| " + " | ".join(cells) + " |")
    known = sorted(tasks & set(TASKS))
    lines += ["", "Each objective's own metric: " + "; ".join(f"{t}: {TASKS[t].metric}" for t in known) + ".", ""]
    return "\n".join(lines)


def _cost_text(spent) -> str:
    """'3.2 worker-h, 2.9 CPU-h' (minutes under 6 min) from workers.cost(), '-' without it."""
    if spent is None:
        return "-"
    wall, cpu = spent
    scale, unit = (3600, "h") if wall >= 360 else (60, "min")   # a demo's minutes are no '0.0 h'
    return f"{wall / scale:.1f} worker-{unit}" + (f", {cpu / scale:.1f} CPU-{unit}" if cpu is not None else "")


def _data_text(exp, saved: dict) -> str:
    """'cifar10', or 'caltech101-subset (imagefolder)' when the data has its own name; subsets and size."""
    name = _data_label(saved)
    text = name if name == exp.data.dataset else f"{name} ({exp.data.dataset})"
    d = exp.data
    extra = [f"{d.train_per_class} train / class" if d.train_per_class else "",
             f"{d.test_per_class} test / class" if d.test_per_class else "",
             f"{d.image_size}px" if d.image_size else ""]
    return ", ".join([text, *filter(None, extra)])


def _schedule_text(t) -> str:
    """'sgd lr 0.1 momentum 0.9 wd 0.0001, batch 128, epochs 160, lr step x0.1 at 80/120, warm-up 1'."""
    lr = f"{t.optimizer} lr {t.lr:g}" + (f" momentum {t.momentum:g}" if t.momentum else "")
    lr += f" wd {t.weight_decay:g}" if t.weight_decay else ""
    schedule = (f"step x{t.gamma:g} at {'/'.join(map(str, t.milestones))}" if t.schedule == "step" and t.milestones
                else t.schedule)
    warmup = f", warm-up {t.warmup_epochs}" if t.warmup_epochs else ""
    parts = f" in {t.accumulate} parts" if t.accumulate > 1 else ""
    return f"{lr}, batch {t.batch_size}{parts}, epochs {t.epochs}, lr {schedule}{warmup}"


def _pruning_text(p) -> str:
    """'20% per level, rewind to 1ep, weight' (the layers and scope when set)."""
    reset = f"rewind to {p.rewind}" if p.reset == "rewind" else p.reset
    layers = f", first {p.layers} conv layers" if p.layers else ""
    scope = ", each layer alone" if p.scope == "layer" else ""
    return f"{p.fraction:.0%} per level, {reset}, {p.granularity}{layers}{scope}"


def _git_text(git: str | None) -> str:
    if not git:
        return "not recorded"
    if git == "unknown":
        return "unknown (no git where it ran)"
    sha, dirty = git.removesuffix("+dirty"), git.endswith("+dirty")
    return f"{sha[:12]}" + (" + uncommitted changes" if dirty else "")


def cost_summary(rows: list[dict]) -> list[dict]:
    """Accuracy next to cost: per (eval, curve, level) over the replicates whose mask has a
    cost.json, the mean test accuracy, params, MACs ratio and speed-ups (task and retrain rows)."""
    groups = defaultdict(list)
    for r in rows:
        if r["eval"] in ("task", "retrain") and r["metric"] == "test_acc" and r["macs"] != "":
            groups[(r["eval"], f"{r['objective']} / {r['reset']}", r["level"])].append(r)
    out = []
    for (ev, curve, level), rs in sorted(groups.items()):
        n = len(rs)
        speedups = {k: sum(r[f"speedup_{k}"] for r in rs) / n for k in SPEEDUPS if all(r[f"speedup_{k}"] != "" for r in rs)}
        out.append(dict(eval=ev, curve=curve, level=level, n=n, granularity=rs[0]["granularity"],
                        measure=rs[0].get("measure", "test_acc"),
                        remaining=sum(r["remaining"] for r in rs) / n, acc=sum(r["value"] for r in rs) / n,
                        params=sum(r["params"] for r in rs) / n, macs_ratio=sum(r["macs_ratio"] for r in rs) / n,
                        speedup=speedups))
    return out


def cost_markdown(costs: list[dict]) -> str:
    if not costs:
        return ""
    keys = [k for k in SPEEDUPS if any(k in c["speedup"] for c in costs)]
    ns = {c["n"] for c in costs}
    lines = ["## Cost of the pruned networks (sslprune eval cost; mean over replicates)", "",
             "MACs per image and non-zero conv/linear weights of the network each mask gives (channel "
             "granularity: channels removed; weight granularity: the dense kernels), and speed-ups over "
             "the dense network measured in the same call.", "",
             f"| eval | curve | level | remaining | test metric | value ({_n_header(ns)}) | params | MACs | "
             + " | ".join(f"speed-up {k}" for k in keys) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(keys)]
    for c in costs:
        n = f" (n={c['n']})" if len(ns) > 1 else ""
        lines.append(f"| {c['eval']} | {c['curve']} | {c['level']} | {c['remaining']:.2%} | {c['measure']} | "
                     f"{c['acc']:.4f}{n} | {c['params']:,.0f} | {c['macs_ratio']:.3f}x | "
                     + " | ".join(f"{c['speedup'][k]:.2f}x" if k in c["speedup"] else "" for k in keys) + " |")
    return "\n".join(lines + [""])


def plot_cost(costs: list[dict], path: Path):
    """Test accuracy against MACs and against measured speed-up (PyTorch, CPU, batch 64), every
    curve (weight and channel granularity side by side). Returns the (closed) figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = sorted({c["measure"] for c in costs})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for (ev, curve) in sorted({(c["eval"], c["curve"]) for c in costs}):
        pts = sorted((c for c in costs if (c["eval"], c["curve"]) == (ev, curve)), key=lambda c: c["level"])
        # one axis, several measures (a rotation run's own accuracy beside re-trained class accuracy):
        # the legend says which curve measures what
        label = f"{curve} ({ev})" if len(measures) == 1 else f"{curve} ({ev}: {pts[0]['measure']})"
        style = "--" if "random" in curve else "-"
        axes[0].plot([100 * c["macs_ratio"] for c in pts], [c["acc"] for c in pts], style, marker="o", ms=3, label=label)
        sp = [c for c in pts if "torch_cpu_b64" in c["speedup"]]
        axes[1].plot([c["speedup"]["torch_cpu_b64"] for c in sp], [c["acc"] for c in sp], style, marker="o", ms=3, label=label)
    percent_axis(axes[0], [100 * c["macs_ratio"] for c in costs])
    axes[0].invert_xaxis()
    axes[0].set_xlabel("MACs per image (% of dense)")
    axes[1].set_xlabel("measured speed-up over dense (PyTorch, CPU, batch 64)")
    ylabel = f"test {measures[0]}" if len(measures) == 1 else "test accuracy, each curve's metric in the legend"
    for ax in axes:
        ax.set_ylabel(textwrap.fill(f"{ylabel} (mean over replicates)", 45))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    thin_labels(fig)
    save_png(fig, path)
    return fig


def plot(summary: list[dict], path: Path):
    """One panel per section, accuracy against remaining weights. Returns the (closed) figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = _sections(summary) or [("retrain", "test_acc", "", "no results yet", "test accuracy")]
    cols = min(3, len(sections))
    rows_ = math.ceil(len(sections) / cols)
    # each row of panels 4.5 inches, and room below for its longest legend when that goes below
    entries = [len({(s["objective"], s["reset"]) for s in _rows(summary, *sec[:3])}) for sec in sections]
    heights = [4.5 + max(legend_height(n) for n in entries[r * cols:(r + 1) * cols]) for r in range(rows_)]
    fig, axes = plt.subplots(rows_, cols, figsize=(6 * cols, sum(heights)), squeeze=False,
                             gridspec_kw=dict(height_ratios=heights))
    for ax in axes.flat[len(sections):]:
        ax.set_visible(False)
    colour = colours(s["objective"] for s in summary)   # what found the mask: the same in every panel
    for ax, (ev, metric, measure, title, ylabel) in zip(axes.flat, sections):
        rows = _rows(summary, ev, metric, measure)
        spread = any(s["n"] > 1 for s in rows)  # error bars and '± s.e.' only when there is a spread
        for obj, reset in sorted({(s["objective"], s["reset"]) for s in rows}):
            pts = sorted((s for s in rows if (s["objective"], s["reset"]) == (obj, reset)),
                         key=lambda s: -s["remaining"])
            x = [100 * s["remaining"] for s in pts]
            y = [s["mean"] for s in pts]
            err = [0 if math.isnan(s["se"]) else s["se"] for s in pts] if spread else None
            label = {"random": f"random pruning ({obj} run)",
                     "random_adjusted": f"random, natural zeros first ({obj} run)"}.get(reset, f"{obj} / {reset}")
            ax.errorbar(x, y, yerr=err, marker="o", ms=3, capsize=2, color=colour[obj],
                        ls=LINESTYLES.get(reset, "-"), label=label)
        percent_axis(ax, [100 * s["remaining"] for s in rows])
        ax.invert_xaxis()  # pruning proceeds to the right, as in the paper
        ax.set_xlabel("remaining weights (%)")
        ax.set_ylabel(textwrap.fill(f"{ylabel} (mean ± s.e.)" if spread else ylabel, 56))
        ax.set_title(textwrap.fill(title, 60), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if rows:
            legend(ax)
    thin_labels(fig)
    save_png(fig, path)
    return fig


STABILITY_COLUMNS = ["experiment", "objective", "replicate", "level", "remaining", "rewind", "rewind_epochs",
                     "instability", "points", "batchnorm", "retrained_acc"]


def collect_stability(exp_dirs: list[Path]) -> list[dict]:
    """One row per measured ticket (eval stability): its instability, and the accuracy of its mask
    re-trained on labels from its rewind point (retrain_rewind, when run), by objective without the
    rewind point (the figure's x axis)."""
    names = labels(exp_dirs, ignore=("rewind",))
    rows = []
    for exp_dir in exp_dirs:
        exp, _ = load_experiment(exp_dir)
        layers = pruned_layers(build_backbone(exp), exp.prune.layers)
        for replicate, level, ldir in layout.levels(exp_dir):
            sdir, retrained = layout.stability_dir(ldir), layout.run_dir(ldir, "rewind")
            if not layout.is_done(sdir):
                continue
            st = layout.load_json(sdir / layout.DONE)
            rows.append(dict(experiment=Path(exp_dir).name, objective=names[Path(exp_dir).resolve()], replicate=replicate,
                             level=level, remaining=density(layout.load_mask(ldir / layout.MASK), layers),
                             rewind=st["rewind"], rewind_epochs=st["rewind_epochs"], instability=st["instability"],
                             points=len(st["alphas"]),   # the path's resolution: its maximum is over these
                             batchnorm=bn_description(st),  # paths measured otherwise are told apart
                             retrained_acc=layout.load_json(retrained / layout.DONE)["test_acc"]
                             if layout.is_done(retrained) else ""))
    return rows


def mean_se(vals: list[float]) -> tuple[float, float, int]:
    """Mean, standard error (sample std / sqrt(n); nan for n = 1) and n."""
    n = len(vals)
    mean = sum(vals) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1) / n) if n > 1 else float("nan"), n


def stability_summary(rows: list[dict]) -> list[dict]:
    """Per (objective, level, rewind point): instability and re-trained accuracy over replicates."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["objective"], r["level"], r["rewind_epochs"])].append(r)
    out = []
    for (obj, level, epochs), rs in sorted(groups.items()):
        acc = [r["retrained_acc"] for r in rs if r["retrained_acc"] != ""]
        out.append(dict(objective=obj, level=level, rewind_epochs=epochs, rewind=rs[0]["rewind"],
                        remaining=sum(r["remaining"] for r in rs) / len(rs),
                        points="/".join(str(p) for p in sorted({r["points"] for r in rs})),
                        batchnorm="; ".join(sorted({r["batchnorm"] for r in rs})),   # more than one: said
                        instability=mean_se([r["instability"] for r in rs]),
                        retrained=mean_se(acc) if acc else None))
    return out


def stability_markdown(summary: list[dict]) -> str:
    if not summary:
        return ""
    cell = lambda m: "" if m is None else _value(dict(mean=m[0], se=m[1], n=m[2]), with_n=True)  # noqa: E731
    lines = ["## Stability to SGD noise against the rewind point (sslprune eval stability)", "",
             "Linear-mode-connectivity instability (Frankle et al. 2020): max test error on the straight line "
             "between two copies trained from the rewind point, minus the mean error of the two, on the "
             "objective's own task (its metric above); about 0: stable. Re-trained: the mask re-trained on "
             "labels from the same rewind point.", "",
             "| objective | level | remaining | rewind (epochs) | instability | points on the path | batch-norm on the path "
             "| re-trained accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['objective']} | {s['level']} | {s['remaining']:.2%} | {s['rewind']} ({s['rewind_epochs']:g}) | "
                     f"{cell(s['instability'])} | {s['points']} | {s['batchnorm']} | {cell(s['retrained'])} |")
    return "\n".join(lines + [""])


def plot_stability(summary: list[dict], path: Path):
    """Instability and re-trained accuracy against the rewind point, a line per (objective, density)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = sorted({(s["objective"], s["level"]) for s in summary})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5 + legend_height(len(curves))), squeeze=False)
    # objectives by colour, densities by line and marker: the question is one objective against
    # another at the same density
    colour = colours(obj for obj, _ in curves)
    levels = sorted({level for _, level in curves})
    looks = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]
    for obj, level in curves:
        ls, marker = looks[levels.index(level) % len(looks)]
        pts = sorted((s for s in summary if (s["objective"], s["level"]) == (obj, level)), key=lambda s: s["rewind_epochs"])
        label = f"{obj}, {100 * pts[0]['remaining']:.3g}% of the weights"
        for ax, key in zip(axes.flat, ("instability", "retrained")):
            kept = [p for p in pts if p[key] is not None]
            if kept:
                ax.errorbar([p["rewind_epochs"] for p in kept], [p[key][0] for p in kept],
                            yerr=[0 if math.isnan(p[key][1]) else p[key][1] for p in kept],
                            color=colour[obj], ls=ls, marker=marker, ms=4, capsize=2, label=label)
    for ax, ylabel in zip(axes.flat, ("instability (max error on the path - mean of the ends)",
                                      "test class accuracy, re-trained on labels from the rewind point")):
        ax.set_xlabel("rewind point (epochs of dense training)")
        ax.set_ylabel(textwrap.fill(ylabel, 56))
        ax.grid(True, alpha=0.3)
        if ax.lines:
            legend(ax)
    axes.flat[0].axhline(0, color="grey", lw=0.8)
    axes.flat[0].set_title("Linear-mode-connectivity instability of the tickets", fontsize=10)
    axes.flat[1].set_title("Their masks re-trained on labels", fontsize=10)
    save_png(fig, path)
    return fig


def write_report(exp_dirs: list[Path], out: Path) -> dict[str, Path]:
    exp_dirs = experiments(exp_dirs)
    masks = {}   # each mask's counts, read once for both tables
    rows = collect(exp_dirs, masks)
    summary = summarise(rows)
    out = Path(out)
    paths = {"csv": out / "results.csv", "md": out / "summary.md", "png": out / "accuracy_vs_remaining.png",
             "svg": out / "accuracy_vs_remaining.svg"}
    _save_csv(paths["csv"], COLUMNS, rows)   # 'measure' is for the summary, not a column
    costs = cost_summary(rows)
    stable = collect_stability(exp_dirs)
    stable_summary = stability_summary(stable)
    dual, blocks = report_dual.collect_dual(exp_dirs)
    per_layer = report_layers.collect(exp_dirs, labels(exp_dirs), masks)
    layer_summary = report_layers.summarise(per_layer)
    layout.save_text(paths["md"], "# sslprune report\n\n" + provenance(exp_dirs) + "\n" + markdown(summary) + "\n"
                     + cost_markdown(costs) + stability_markdown(stable_summary) + report_dual.markdown(dual, blocks)
                     + report_layers.markdown(layer_summary))
    if per_layer:
        paths["layers_csv"], paths["layers_png"] = out / "layer_density.csv", out / "layer_density.png"
        _save_csv(paths["layers_csv"], report_layers.COLUMNS, per_layer)
        report_layers.plot(layer_summary, paths["layers_png"])
    if dual:
        paths["dual_csv"], paths["dual_png"] = out / "dual.csv", out / "dual_accuracy_vs_macs.png"
        _save_csv(paths["dual_csv"], report_dual.DUAL_COLUMNS, dual)
        report_dual.plot(dual, paths["dual_png"])
    if stable:
        paths["stability_csv"], paths["stability_png"] = out / "stability.csv", out / "stability_vs_rewind.png"
        _save_csv(paths["stability_csv"], STABILITY_COLUMNS, stable)
        plot_stability(stable_summary, paths["stability_png"])
    plot(summary, paths["png"])
    if costs:
        paths["cost_png"], paths["cost_svg"] = out / "accuracy_vs_cost.png", out / "accuracy_vs_cost.svg"
        plot_cost(costs, paths["cost_png"])
    return paths


def _save_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    """rows as CSV with these columns (other keys left out), written atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    layout.save_text(path, buf.getvalue())
