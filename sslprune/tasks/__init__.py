"""TASKS maps a name to a Task class, built as Task(cfg, feature_dim, num_classes, num_train)."""
from __future__ import annotations

from ..errors import UserError
from .base import UNLABELLED, Batch, Task
from .exemplar import Exemplar
from .labels import Labels
from .npid import NPID
from .rotation import Rotation
from .s4l import S4LRotation
from .vicreg import VICReg

TASKS = {
    "labels": Labels,          # cross-entropy on classes (optionally on a labelled subset)
    "rotation": Rotation,      # RotNet: 4 exact rotations, 4-way head
    "exemplar": Exemplar,      # triplet loss between two random transformations of each image
    "npid": NPID,              # instance discrimination against a memory bank, NCE
    "s4l": S4LRotation,        # labels on the labelled subset + RotNet on every image
    "vicreg": VICReg,          # variance-invariance-covariance between two views' projections
}


def build_task(cfg, feature_dim: int, num_classes: int, num_train: int) -> Task:
    """cfg: a config.Task (its `task` names the class; the other fields are its options)."""
    if cfg.task not in TASKS:
        raise UserError(f"unknown task '{cfg.task}'; choose one of: {', '.join(TASKS)}")
    return TASKS[cfg.task](cfg, feature_dim, num_classes, num_train)


__all__ = ["TASKS", "UNLABELLED", "Batch", "Task", "build_task"]
