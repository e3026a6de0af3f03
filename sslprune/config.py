"""Typed, frozen configuration. Defaults mean "off"; the run directory is named by a hash of the
non-default fields, so adding an option whose default changes nothing keeps old run names intact
(open_lth's discipline).

Presets are plain dicts of flag values applied before the user's own flags.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from dataclasses import dataclass, field, fields
from typing import Annotated, get_type_hints

from .errors import UserError


@dataclass(frozen=True)
class Data:
    dataset: Annotated[str, "DATASETS key: digits | cifar10 | imagefolder"] = ""
    image_size: Annotated[int, "resize + centre-crop to this side (0 = keep native size)"] = 0
    train_per_class: Annotated[int, "keep the first N training images of each class (0 = all)"] = 0
    test_per_class: Annotated[int, "keep the first N test images of each class (0 = all)"] = 0
    crop_pad: Annotated[int, "random crop of an image zero-padded by this many pixels (0 = off)"] = 0
    flip: Annotated[bool, "random horizontal flip"] = False
    stream: Annotated[bool, "imagefolder: read the training images from disk every epoch (DataLoader workers), as random-resized crops to --image-size: for data that does not fit in memory"] = False


@dataclass(frozen=True)
class Model:
    model: Annotated[str, "MODELS key"] = ""
    pretrained: Annotated[str, "start level 0 from these backbone weights: a model.safetensors of ours, a torchvision-layout state dict (.pth/.safetensors), a public self-supervised checkpoint (MoCo v1-v3, DINO, SwAV, SimCLR, solo-learn, lightly, VISSL; layout detected), or a lottery run directory (replicate r starts from its replicate r's trained level 0) (empty = from scratch)"] = ""
    pretrained_prefix: Annotated[str, "key prefix of the backbone in a --pretrained checkpoint, e.g. module.encoder_q. ('' = detect it; 'none' = keys as they are)"] = ""


@dataclass(frozen=True)
class Task:
    task: Annotated[str, "TASKS key: labels | rotation | exemplar | npid | s4l | vicreg"] = ""
    label_fraction: Annotated[float, "labels, s4l: keep the labels of this fraction of the training set (0 = all)"] = 0.0
    label_split: Annotated[str, "images: that fraction of every class; classes: that fraction of the classes, all their images"] = "images"
    label_seed: Annotated[int, "seed of the labelled subset (fixed per experiment, saved with it)"] = 0
    embedding_dim: Annotated[int, "exemplar, npid: size of the L2-normalised embedding head"] = 128
    margin: Annotated[float, "exemplar: triplet margin on the distance of unit embeddings (in [0, 2])"] = 0.5
    nce_negatives: Annotated[int, "npid: K negatives per image drawn from the memory bank for NCE"] = 4096
    temperature: Annotated[float, "npid: softmax temperature of the bank similarities"] = 0.07
    bank_momentum: Annotated[float, "npid: bank row <- normalise(m * row + (1 - m) * new embedding)"] = 0.5
    z_momentum: Annotated[float, "npid: moving average of the NCE normaliser Z (1.0 = fixed after the first batch, as Wu et al.)"] = 0.9
    knn: Annotated[int, "npid: neighbours of the weighted kNN monitor on the test set"] = 200
    projector_dim: Annotated[int, "vicreg: width of the projector's three layers (2048 in the paper)"] = 2048
    budget: Annotated[float, "vicreg: train a gated path beside the dense one, at this fraction of the dense MACs (Krishna et al. 2023; --model resnet20 or resnet18_cifar) (0 = off)"] = 0.0
    rotation_weight: Annotated[float, "s4l: weight of the rotation loss next to the label loss"] = 1.0


@dataclass(frozen=True)
class Train:
    optimizer: Annotated[str, "sgd | adam | lars (SGD with layer-wise trust ratios, as solo-learn's VICReg; sslprune/lars.py)"] = "sgd"
    lr: Annotated[float, "base learning rate (after warm-up, before decay)"] = 0.0
    momentum: Annotated[float, "SGD only"] = 0.0
    weight_decay: Annotated[float, "L2 added to the gradient (Adam + L2, as in the paper)"] = 0.0
    batch_size: Annotated[int, "images per step (RotNet shows each in 4 rotations: 4x inputs)"] = 0
    epochs: Annotated[int, "passes over the training set"] = 0
    schedule: Annotated[str, "constant | step | cosine"] = "constant"
    milestones: Annotated[tuple[int, ...], "epochs at which the step schedule multiplies lr by gamma"] = ()
    gamma: Annotated[float, "lr factor at each milestone"] = 0.1
    warmup_epochs: Annotated[int, "linear warm-up from 0, in epochs (0 = off)"] = 0
    accumulate: Annotated[int, "micro-batches per update: each batch in N equal parts whose gradients are summed before one step, for batches larger than memory (labels, rotation); batch-norm normalises each part, on any number of processes (1 = off)"] = 1


@dataclass(frozen=True)
class Prune:
    fraction: Annotated[float, "fraction of the *surviving* prunable weights removed per level"] = 0.2
    reset: Annotated[str, "how each level starts: rewind (winning ticket) | reinit (random re-init)"] = "rewind"
    rewind: Annotated[str, "rewind point: \"<N>it\" (updates) or \"<N>ep\" (epochs); 0 = the init"] = "0it"
    layers: Annotated[int, "layerwise pruning: prune only the first N conv layers, the rest stays dense (0 = all layers)"] = 0
    granularity: Annotated[str, "weight: single weights (unstructured) | channel: whole channels (structured: a compact network can be exported)"] = "weight"
    scope: Annotated[str, "weight granularity: global (rank every pruned layer's weights together, as Frankle & Carbin and the paper: layers end at different densities) | layer (each layer loses the fraction of its own survivors: every pruned layer keeps the same density)"] = "global"
    channel_score: Annotated[str, "channel granularity: rank channels by l1 | l2 (of their weights) | bn (batch-norm |gamma|)"] = "l1"
    channel_round: Annotated[int, "channel granularity: every layer keeps a multiple of N channels (8: faster kernels; 1 = off)"] = 1
    retrain_as: Annotated[str, "re-train masks on labels (sslprune retrain) with this preset's training settings, e.g. cifar10-resnet18-paper: every objective's masks judged under one labels schedule ('' = this run's own)"] = ""


@dataclass(frozen=True)
class Experiment:
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    task: Task = field(default_factory=Task)
    train: Train = field(default_factory=Train)
    prune: Prune = field(default_factory=Prune)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Experiment":
        sections = {}
        for f in fields(cls):
            sub = f.default_factory  # the section's class
            known = {g.name for g in fields(sub)}
            given = d.get(f.name, {})
            if not isinstance(given, dict):
                raise UserError(f"config section '{f.name}' is a {type(given).__name__}, not a table of fields; "
                                f"the file was damaged or edited")
            unknown = set(given) - known
            if unknown:
                raise UserError(f"unknown config field(s) {sorted(unknown)} in section '{f.name}'; "
                                f"valid: {sorted(known)}")
            vals = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
            sections[f.name] = sub(**vals)
        return cls(**sections)

    @classmethod
    def from_flat(cls, values: dict) -> "Experiment":
        """From flag-style values {field: value} (field names are unique across sections);
        keys that are no config field (e.g. levels) are ignored."""
        return cls(**{f.name: f.default_factory(**{g.name: values[g.name] for g in fields(f.default_factory)
                                                    if g.name in values}) for f in fields(cls)})

    def non_default(self) -> dict:
        """Only the fields that differ from their default: what names the run."""
        return {f.name: diff for f in fields(self) if (diff := non_default(getattr(self, f.name)))}

    def hash(self) -> str:
        blob = json.dumps(self.non_default(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def name(self) -> str:
        return f"{self.task.task}_{self.model.model}_{self.data.dataset}_{self.hash()}"

    def validate(self) -> None:
        """Fail early, before any work, with the fix in the message."""
        self._validate_types()
        from .channels import CHANNEL_SCORES
        from .data import DATASETS
        from .models import MODELS
        from .tasks import TASKS
        _choose("dataset", self.data.dataset, DATASETS)
        _choose("model", self.model.model, MODELS)
        _choose("task", self.task.task, TASKS)
        _choose("optimizer", self.train.optimizer, {"sgd", "adam", "lars"})
        _choose("schedule", self.train.schedule, {"constant", "step", "cosine"})
        _choose("reset", self.prune.reset, {"rewind", "reinit"})
        _choose("granularity", self.prune.granularity, {"weight", "channel"})
        _choose("scope", self.prune.scope, {"global", "layer"})
        if self.prune.granularity == "channel" and self.prune.scope != "global":
            raise UserError("--scope layer prunes single weights layer by layer; channel granularity ranks "
                            "channels across layers (scores normalised per group): drop --scope")
        if self.prune.retrain_as:
            _choose("retrain-as", self.prune.retrain_as, set(PRESETS))
        _choose("channel-score", self.prune.channel_score, CHANNEL_SCORES)
        for name in ("channel_score", "channel_round"):
            if self.prune.granularity != "channel" and getattr(self.prune, name) != getattr(Prune(), name):
                raise UserError(f"--{name.replace('_', '-')} applies to --granularity channel only; drop it")
        if self.prune.channel_round < 1:
            raise UserError(f"--channel-round must be at least 1 (1 = off), got {self.prune.channel_round}")
        if self.prune.granularity == "channel" and self.prune.layers:
            raise UserError("--layers prunes single weights of the first N convs; with --granularity channel "
                            "drop --layers")
        if self.prune.layers < 0:
            raise UserError(f"--layers must be >= 0 (0 = every layer), got {self.prune.layers}")
        if not 0.0 < self.prune.fraction < 1.0:
            raise UserError(f"--fraction must be in (0, 1), got {self.prune.fraction}")
        unset = [n for n in REQUIRED if getattr(self.train, n) == 0]
        if unset:  # no default fits every model and dataset: a preset or the user gives them
            raise UserError(f"no {', '.join('--' + n.replace('_', '-') for n in unset)} (unset or 0): set "
                            f"{'it' if len(unset) == 1 else 'them'} above 0, or start 'sslprune lottery' from a --preset "
                            f"({', '.join(sorted(PRESETS))})")
        for name in REQUIRED:
            if getattr(self.train, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self.train, name)}")
        for name, value in (("weight_decay", self.train.weight_decay), ("momentum", self.train.momentum),
                            ("warmup_epochs", self.train.warmup_epochs), ("crop_pad", self.data.crop_pad),
                            ("image_size", self.data.image_size), ("train_per_class", self.data.train_per_class),
                            ("test_per_class", self.data.test_per_class)):
            if value < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if self.train.accumulate < 1 or self.train.batch_size % self.train.accumulate:
            raise UserError(f"--accumulate must be >= 1 and divide --batch-size {self.train.batch_size} "
                            f"into equal parts, got {self.train.accumulate}")
        if self.train.optimizer in ("sgd", "lars") and not 0.0 <= self.train.momentum < 1.0:
            raise UserError(f"--momentum must be in [0, 1) (0.9 is usual), got {self.train.momentum}")
        if self.train.optimizer == "adam" and self.train.momentum:
            raise UserError("--momentum applies to --optimizer sgd or lars only (Adam has its own betas); drop it")
        if not self.train.gamma > 0:
            raise UserError(f"--gamma must be > 0, got {self.train.gamma}")
        if self.train.schedule == "step" and not self.train.milestones:
            raise UserError("--schedule step needs --milestones (the epochs where lr is multiplied by --gamma, "
                            "e.g. --milestones 80,120); without them lr would stay constant: say --schedule constant")
        if self.train.warmup_epochs > self.train.epochs:
            raise UserError(f"--warmup-epochs {self.train.warmup_epochs} exceeds --epochs {self.train.epochs}")
        if self.data.stream and self.data.dataset != "imagefolder":
            raise UserError(f"--stream reads an ImageFolder from disk; --dataset {self.data.dataset} is held in memory: drop --stream")
        if self.data.stream and self.data.crop_pad:
            raise UserError("--crop-pad does not apply with --stream (its random-resized crop replaces it): drop --crop-pad")
        if self.model.pretrained_prefix and not self.model.pretrained:
            raise UserError("--pretrained-prefix applies to a --pretrained checkpoint; drop it or pass --pretrained FILE")
        parse_rewind(self.prune.rewind)
        self._validate_task()

    def _validate_types(self) -> None:
        """Every field holds its declared type (a config file or sweep spec may say lr = "abc"), and
        every float is finite: NaN passes every range check, and NaN != NaN would make a run that
        can never be resumed."""
        for f in fields(self):
            section = getattr(self, f.name)
            for g in fields(section):
                value, kind = getattr(section, g.name), type(getattr(type(section)(), g.name))
                flag = f"--{g.name.replace('_', '-')}"
                if kind is float and isinstance(value, int) and not isinstance(value, bool):
                    continue  # 1 for 1.0
                if kind is tuple:
                    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                       for v in value):
                        raise UserError(f"{flag} takes a list of whole numbers (e.g. [80, 120]), got {value!r}")
                    continue
                if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                    what = {int: "a whole number", float: "a number", str: "text", bool: "true or false"}[kind]
                    raise UserError(f"{flag} takes {what}, got {value!r}")
                if kind is float and not math.isfinite(value):
                    raise UserError(f"{flag} must be a finite number, got {value}")

    def _validate_task(self) -> None:
        from .tasks import TASKS
        t, default = self.task, Task()
        for g in fields(Task):
            if g.name != "task" and getattr(t, g.name) != getattr(default, g.name) and g.name not in TASKS[t.task].options:
                tasks = [name for name, cls in TASKS.items() if g.name in cls.options]
                raise UserError(f"--{g.name.replace('_', '-')} applies to --task {' or '.join(tasks)} only, "
                                f"not '{t.task}'; drop it")
        _choose("label-split", t.label_split, {"images", "classes"})
        if not 0.0 <= t.label_fraction <= 1.0:
            raise UserError(f"--label-fraction must be in [0, 1] (0 = all labels), got {t.label_fraction}")
        TASKS[t.task].check_config(t)
        from .models import GATED
        if t.budget and self.model.model not in GATED:
            raise UserError(f"--budget trains a gated path, which --model {self.model.model} does not have; "
                            f"choose --model {' or '.join(GATED)}")
        if t.budget and self.model.pretrained:
            raise UserError("--budget trains the dense and the gated path together from scratch (as Krishna et al.); "
                            "drop --pretrained")
        for name in ("embedding_dim", "nce_negatives", "knn", "temperature", "margin", "projector_dim"):
            if not getattr(t, name) > 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0, got {getattr(t, name)}")
        if t.margin > 2.0:
            raise UserError(f"--margin must be in (0, 2]: unit embeddings are at most 2 apart, got {t.margin}")
        if not 0.0 <= t.bank_momentum < 1.0:
            raise UserError(f"--bank-momentum must be in [0, 1), got {t.bank_momentum}")
        if not 0.0 <= t.z_momentum <= 1.0:
            raise UserError(f"--z-momentum must be in [0, 1], got {t.z_momentum}")
        if t.rotation_weight < 0:
            raise UserError(f"--rotation-weight must be >= 0, got {t.rotation_weight}")


# Fields added to a section after a folder name was hashed from its repr (transfer.py's fine-tuning
# folders): stable_repr leaves them out at their defaults, so folders made before keep their names.
ADDED_LATER = ("accumulate",)


def stable_repr(section) -> str:
    """repr(section) without the ADDED_LATER fields that hold their defaults."""
    default = type(section)()
    kept = [f"{g.name}={getattr(section, g.name)!r}" for g in fields(section)
            if not (g.name in ADDED_LATER and getattr(section, g.name) == getattr(default, g.name))]
    return f"{type(section).__qualname__}({', '.join(kept)})"


def non_default(section) -> dict:
    """The fields of one config section that differ from their defaults (JSON values): what defines
    a computation, unchanged when a field is added whose default keeps the old behaviour."""
    default = type(section)()
    return {g.name: _jsonable(getattr(section, g.name)) for g in fields(section)
            if getattr(section, g.name) != getattr(default, g.name)}


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def _choose(what: str, name: str, valid) -> None:
    if not name:
        raise UserError(f"--{what} is required; choose one of: {', '.join(sorted(valid))}")
    if name not in valid:
        raise UserError(f"unknown {what} '{name}'; choose one of: {', '.join(sorted(valid))}")


def parse_rewind(text: str) -> tuple[int, str]:
    """'3ep' -> (3, 'ep'); '100it' -> (100, 'it')."""
    for unit in ("ep", "it"):
        if text.endswith(unit) and text[: -len(unit)].isdigit():
            return int(text[: -len(unit)]), unit
    raise UserError(f"--rewind must look like '1ep' (epochs) or '500it' (updates), got '{text}'")


# The demo's objectives (`sslprune demo --tasks` picks others).
DEMO_TASKS = ("labels", "rotation", "npid")

# Presets: flag values, applied before the user's flags (which override them). `levels` and
# `replicates` are run-time settings: they extend a run without renaming it.
_CIFAR_PAPER = dict(dataset="cifar10", model="resnet18_cifar", optimizer="adam", lr=1e-3, weight_decay=1e-4,
                    batch_size=512, epochs=160, schedule="step", milestones=(80, 120), gamma=0.1, crop_pad=2,
                    flip=True, fraction=0.2, rewind="1ep", levels=30, replicates=6)

_VICREG = dict(dataset="cifar10", model="resnet18_cifar", task="vicreg", optimizer="lars", lr=0.3, momentum=0.9,
               weight_decay=1e-4, batch_size=256, epochs=500, schedule="cosine", milestones=(), warmup_epochs=10,
               crop_pad=0, flip=False)

PRESETS: dict[str, dict] = {
    # The miniature study: scikit-learn's digits (8x8, embedded, no download), a small convnet.
    "demo": dict(dataset="digits", model="convnet", optimizer="adam", lr=2e-3, weight_decay=1e-4,
                 batch_size=64, epochs=12, schedule="cosine", crop_pad=1, rewind="1ep",
                 levels=15, replicates=2),
    # studies/cifar10-cpu: the paper's CIFAR-10 protocol at 2-CPU scale (5,000 training images, the
    # small convnet, 15 epochs; its README says how the schedule was chosen). Its 10%-labels arm
    # re-trains masks under this preset's settings (--retrain-as), as its other arms do under their own.
    "cifar10-cpu": dict(dataset="imagefolder", train_per_class=500, test_per_class=100, model="convnet",
                        optimizer="adam", lr=1e-3, weight_decay=1e-4, batch_size=128, epochs=15, schedule="cosine",
                        crop_pad=2, flip=True, fraction=0.2, rewind="1ep", levels=15, replicates=3),
    # Caron et al. 2020, supplementary: CIFAR-10 Labels & RotNet, ResNet-18 (CIFAR variant).
    "cifar10-resnet18-paper": _CIFAR_PAPER,
    # Caron et al. 2020, supplementary: ImageNet Labels, ResNet-50 (SGD 0.1, momentum 0.9, wd 1e-4,
    # batch 1536, 90 epochs, lr /10 at 50, 65, 80); images streamed from disk, RandomResizedCrop to 224.
    "imagenet-resnet50-paper": dict(dataset="imagefolder", stream=True, image_size=224, flip=True, model="resnet50",
                                    task="labels", optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4,
                                    batch_size=1536, epochs=90, schedule="step", milestones=(50, 65, 80),
                                    fraction=0.2, rewind="3ep", levels=30, replicates=3),
    # Caron et al. 2020, supplementary: CIFAR-10 Exemplar (Adam 3e-4, 180 epochs, lr /10 at 120).
    # Its masks, as every objective's, re-trained on labels under the Labels & RotNet row's schedule.
    "cifar10-resnet18-exemplar-paper": {**_CIFAR_PAPER, "task": "exemplar", "lr": 3e-4, "epochs": 180,
                                        "milestones": (120,), "retrain_as": "cifar10-resnet18-paper"},
    # The paper gives S4L's and 10%-labels' hyper-parameters for ImageNet only; on CIFAR-10 we use
    # its Labels & RotNet row (our reading of Fig. 5) with 10% of the labels, per class. The rewind
    # point is counted in samples, as the paper's ImageNet one: 1 epoch of the 50,000 images is 97
    # updates of 512 (S4L's own epoch, over the unlabelled 45,000 in halves, would be 175; 10%
    # labels' 9).
    "cifar10-resnet18-s4l": {**_CIFAR_PAPER, "task": "s4l", "label_fraction": 0.1, "rewind": "97it"},
    "cifar10-resnet18-10pct-labels": {**_CIFAR_PAPER, "task": "labels", "label_fraction": 0.1, "rewind": "97it"},
    # NPID on CIFAR-10 as Wu et al. 2018 train it (not given by the paper): SGD 0.03, momentum 0.9,
    # weight decay 5e-4, batch 128, 200 epochs, lr /10 at 120 and 160, K = 4096, T = 0.07, m = 0.5.
    "cifar10-resnet18-npid": {**_CIFAR_PAPER, "task": "npid", "optimizer": "sgd", "lr": 0.03,
                              "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 128, "epochs": 200,
                              "milestones": (120, 160), "retrain_as": "cifar10-resnet18-paper"},
    # VICReg as Krishna et al. 2023 train it on CIFAR (solo-learn's scripts): LARS (eta 0.02, clipped,
    # biases and norms excluded), lr 0.3, momentum 0.9, wd 1e-4, batch 256, 10 warm-up epochs then
    # cosine, projector 2048, 500 epochs. Views: the task's own (crops of 0.2-1).
    # The lottery's settings are the paper's (_CIFAR_PAPER: 30 levels of 20%, rewind to 1 epoch).
    "cifar10-resnet18-vicreg": {**_CIFAR_PAPER, **_VICREG},
    # Their VICReg-Dual: one training (no pruning), a gated path at 30% of the dense MACs (their t_d:
    # 0.1-0.5, --budget), 5 seeds as their Table 1.
    "cifar10-resnet18-vicreg-gated": {**_VICREG, "budget": 0.3, "levels": 0, "replicates": 5},
}


REQUIRED = ("lr", "batch_size", "epochs")       # Train fields without a default (0 = unset)
RUN_DEFAULTS = {"levels": 3, "replicates": 1}   # how much of an experiment a command runs (not its name)


def field_help(section: type) -> dict[str, str]:
    """Each field's help, as declared beside it (Annotated[type, help])."""
    hints = get_type_hints(section, include_extras=True)
    return {name: hint.__metadata__[0] for name, hint in hints.items() if hasattr(hint, "__metadata__")}


def field_names() -> set[str]:
    return {g.name for f in fields(Experiment) for g in fields(f.default_factory)}


def resolve(values: dict, where: str = "flags", base_dir: Path | None = None) -> tuple[Experiment, dict]:
    """defaults < preset < values: the one resolution of the CLI's flags, a --config file and a
    sweep spec's [base] + grid point. values: configuration fields (flag names without dashes),
    'preset', and 'levels' / 'replicates'. A relative 'pretrained' path is taken from base_dir (a
    config file's folder) and made absolute: one file, one experiment name, wherever it runs from.
    Returns the experiment and {levels, replicates}."""
    values = dict(values)
    preset = values.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise UserError(f"{where}: unknown preset '{preset}'; choose one of: {', '.join(sorted(PRESETS))}")
    unknown = sorted(set(values) - field_names() - set(RUN_DEFAULTS))
    if unknown:
        raise UserError(f"{where}: '{unknown[0]}' is no configuration field; use the flag names without dashes "
                        f"(e.g. batch_size), 'preset', 'levels' or 'replicates'")
    flat = {**RUN_DEFAULTS, **(PRESETS[preset] if preset else {}), **values}
    levels, replicates = flat["levels"], flat["replicates"]
    if not _whole(levels) or levels < 0:
        raise UserError(f"{where}: levels must be a whole number >= 0, got {levels!r}")
    if not (_whole(replicates) and replicates >= 1 or isinstance(replicates, (list, tuple)) and replicates
            and all(_whole(r) and r >= 1 for r in replicates)):
        raise UserError(f"{where}: replicates must be a count >= 1 or a list of replicate numbers >= 1, "
                        f"got {replicates!r}")
    flat = {k: tuple(v) if isinstance(v, list) and k != "replicates" else v for k, v in flat.items()}
    if flat.get("pretrained"):
        flat["pretrained"] = str((Path(base_dir or ".") / flat["pretrained"]).resolve())
    return Experiment.from_flat(flat), {k: flat[k] for k in RUN_DEFAULTS}


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_config(path: Path) -> dict:
    """A run's configuration file (--config): TOML with the keys of a sweep's [base] (fields,
    'preset'), and 'levels' / 'replicates'."""
    import tomllib
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"no configuration file at {path}; pass a TOML file of flag names without dashes") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid TOML ({e}); fix it") from None
    nested = [k for k, v in raw.items() if isinstance(v, dict)]
    if nested:
        raise UserError(f"{path}: [{nested[0]}] tables are for sweep specs; a --config file holds plain "
                        f"keys (e.g. lr = 0.001)")
    return raw
