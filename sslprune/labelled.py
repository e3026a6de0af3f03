"""Few labels: which training images keep their label, and the dataset each objective trains on.

Two ways to keep a fraction f of the labels (the paper's two "10%" variants):
- images:  in every class, round(f * n_c) images chosen at random (at least 1);
- classes: round(f * C) classes chosen at random (at least 1), with all their images.
The choice depends on (labels, f, split, seed) only, is saved with the experiment
(labelled.safetensors) and checked on every later run.

Hiding happens here, once: the S4L dataset's unlabelled images get label UNLABELLED (-1) before any
task or training code sees them, and the "10% labels" dataset simply drops them.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from . import layout
from .config import Experiment
from .data import Dataset
from .errors import UserError
from .tasks import TASKS, UNLABELLED



def labelled_subset(labels: torch.Tensor, fraction: float, split: str, seed: int) -> torch.Tensor:
    """Sorted indices (M,) of the training images whose label is kept."""
    g = torch.Generator().manual_seed(seed)
    classes = labels.unique()  # sorted
    if split == "classes":
        n = max(1, round(fraction * len(classes)))
        chosen = classes[torch.randperm(len(classes), generator=g)[:n]]
        return torch.isin(labels, chosen).nonzero().flatten()
    keep = []
    for c in classes:
        members = (labels == c).nonzero().flatten()
        n = max(1, round(fraction * len(members)))
        keep.append(members[torch.randperm(len(members), generator=g)[:n]])
    return torch.cat(keep).sort().values


def labelled_subset_checked(exp: Experiment, data: Dataset) -> torch.Tensor:
    t = exp.task
    subset = labelled_subset(data.train.labels, t.label_fraction, t.label_split, t.label_seed)
    n_classes = len(data.train.labels[subset].unique())
    if n_classes < 2:
        raise UserError(f"--label-fraction {t.label_fraction} with --label-split {t.label_split} keeps "
                        f"{n_classes} class; a label loss needs at least 2: raise --label-fraction")
    if TASKS[t.task].unlabelled == "keep" and len(subset) == len(data.train):
        raise UserError(f"--label-fraction {t.label_fraction} labels every training image (rounded per "
                        f"class); --task {t.task} needs unlabelled images too: lower --label-fraction")
    return subset


def task_data(exp: Experiment, exp_dir: Path, data: Dataset) -> Dataset:
    """The dataset the lottery's objective trains on: `data` itself, unless the task keeps only a
    fraction of the labels. The subset is computed once per experiment, then read back and checked."""
    t = exp.task
    if not t.label_fraction or t.label_fraction == 1.0:
        return data
    subset = labelled_subset_checked(exp, data)
    path = Path(exp_dir) / layout.LABELLED
    if path.exists():
        saved = layout.load_tensors(path)["index"]
        if not torch.equal(saved, subset):
            raise UserError(f"{path} holds another labelled subset than the one this code draws for "
                            f"this data; move {exp_dir} away or restore the code that made it")
    else:
        layout.save_tensors(path, {"index": subset})
        # rounding (per class, or of the classes), at least one each, can keep far from the fraction asked
        if t.label_split == "classes":
            unit, n, total = "classes", len(data.train.labels[subset].unique()), len(data.train.labels.unique())
        else:
            unit, n, total = "training labels", len(subset), len(data.train)
        if abs(n / total - t.label_fraction) > 0.1 * t.label_fraction:
            print(f"warning: --label-fraction {t.label_fraction} keeps {n} of {total} {unit} ({n / total:.1%}): "
                  f"rounded, at least one; the report names it by {t.label_fraction:.0%}", file=sys.stderr)
    return restrict_labels(data, subset, drop_unlabelled=TASKS[t.task].unlabelled == "drop")


def restrict_labels(data: Dataset, subset: torch.Tensor, drop_unlabelled: bool) -> Dataset:
    """Keep the labels of the training images in `subset` (indices). The others are dropped
    (drop_unlabelled) or kept with label UNLABELLED: nothing downstream can read their label."""
    train = data.train
    if drop_unlabelled:  # "10% labels": train on the labelled images alone
        train = train.take(subset)
    else:                   # s4l: every image, the unlabelled ones without a label
        hidden = torch.full_like(train.labels, UNLABELLED)
        hidden[subset] = train.labels[subset]
        train = train.relabel(hidden)
    # Channel statistics stay those of all training images: they need no label.
    return Dataset(data.name, train, data.test, data.classes, _stats=data.channel_stats())
