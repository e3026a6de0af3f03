"""TASKS maps a name to a Task class built as Task(feature_dim, num_classes)."""
from __future__ import annotations

from ..errors import UserError
from .base import Task
from .labels import Labels
from .rotation import Rotation

TASKS = {
    "labels": Labels,      # cross-entropy on classes
    "rotation": Rotation,  # RotNet: 4 exact rotations, 4-way head
}


def build_task(name: str, feature_dim: int, num_classes: int) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task '{name}'; choose one of: {', '.join(TASKS)}")
    return TASKS[name](feature_dim, num_classes)
