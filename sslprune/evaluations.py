"""The evaluations of a lottery run's levels, one entry each. The sweep and the CLI go through this
dict and test no evaluation's name, so a new evaluation is its own module (holding its entry) and
its import and name here.

An entry is a small object defined in its evaluation's module; what it has is Evaluation below
(no base class: the evaluation modules need not import this one, which imports them). Its folder
names are layout.py's, as every folder name is: layout.evaluation_dir(level, name) serves one
folder per level; a name that says more is a function of its own there. What `sslprune report`
shows stays report.py's: rows for retrain, probe and finetune, a table for stability, columns for
cost; a new evaluation's results appear there once report.py reads them.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .cost import COST
from .probe import PROBE
from .retrain import RETRAIN
from .stability import STABILITY
from .transfer import FINETUNE

if TYPE_CHECKING:
    from .config import Experiment
    from .sweep import Step, Sweep


class Evaluation(Protocol):
    name: str         # its table under a sweep's [evaluations] and its command, `sslprune eval <name>`
    top_level: bool   # its command is `sslprune <name>` instead (retrain, which came before `eval`)
    help: str         # its line in `sslprune eval --help`
    description: str  # the text atop its own --help

    # in a sweep: one step per item of its spec and level
    def spec(self, value: Any, where: str, here: Path, experiments: list[Experiment]) -> tuple:
        """Its [evaluations] value, checked (a UserError starts with `where`), as a tuple of items.
        `here`: the spec's folder, for relative paths. A CLI-only evaluation (cost) refuses here and
        has none of the sweep's part below."""

    def at(self, item: Any, experiment: Experiment, level: int) -> bool:
        """Whether `item` has a step at `level` of `experiment`."""

    def label(self, sweep: Sweep, step: Step) -> str:
        """The step's name in its level: its ledger key and claim lock (cheap: no data is read)."""

    def out(self, sweep: Sweep, step: Step) -> Path:
        """The folder whose done.json marks the step done."""

    def train_dirs(self, sweep: Sweep, step: Step) -> list[Path]:
        """The training runs the step makes (the sweep counts their epochs)."""

    def run(self, sweep: Sweep, step: Step) -> None:
        """Run the step, with the functions its command runs."""

    # on the command line
    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        """Its command's flags (cli.py's helpers give the shared ones)."""

    def command(self, args: argparse.Namespace, argv: list[str]) -> int:
        """Run it for the parsed flags and print what it did; the exit code."""


EVALUATIONS: dict[str, Evaluation] = {e.name: e for e in (RETRAIN, PROBE, FINETUNE, STABILITY, COST)}
