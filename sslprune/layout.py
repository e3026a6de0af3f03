"""The on-disk contract: directory and file names, atomic writes, strict loads, done-files.

    ROOT/<task>_<model>_<dataset>_<hash>/         one experiment (hash of non-default config)
        config.json                               resolved config, git sha, command lines, versions
        labelled.safetensors                      labelled training images (--label-fraction only)
        replicate_<r>/
            init.safetensors                      dense initialisation (backbone + task head)
            rewind.safetensors                    weights after k updates of level-0 training
            level_<L>/
                mask.safetensors                  bool mask over the backbone's prunable weights
                density.json                      kept / total weights per layer and in total
                cost.json                         params, MACs, latency of the compact network (eval cost)
                train/                            training run of this level (see train.py)
                retrain_<rewind|reinit>/          the mask re-trained on labels
                retrain_random/                   random-pruning baseline at the same density,
                                                  with its own mask.safetensors
                retrain_random_adjusted/          the same, naturally-zero weights pruned first
                probe_<data>[@<stage>]_<fp>/      linear probe: features.safetensors, done.json
                finetune_<data>_<hash>/           the pruned network fine-tuned on a target dataset
                stability/                        linear-mode-connectivity instability: done.json, and
                                                  copy_2/ (copy_1/), the copies' training runs

    a training run:  checkpoint.pt (per-epoch, for resume), log.jsonl, model.safetensors, done.json

Every file is written to a temporary name and renamed, so a killed process leaves either the old
file or the new one, never half of one. A step is done when its done.json exists.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import distributed
from .errors import UserError

CONFIG = "config.json"
DONE = "done.json"
MODEL = "model.safetensors"
CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
MASK = "mask.safetensors"
DENSITY = "density.json"
INIT = "init.safetensors"
LABELLED = "labelled.safetensors"   # the experiment's labelled training images (--label-fraction)
PRETRAINED = "pretrained.json"   # replicate_<r>/: the weights file (and its sha256) level 0 started from
REWIND = "rewind.safetensors"
COST = "cost.json"               # beside a mask: params, MACs and measured latency of its compact network
EXPORT_MODEL = MODEL             # an export folder: the standalone network's tensors (torchvision-style keys)
EXPORT_ONNX = "model.onnx"       # ... the same network for onnxruntime
EXPORT_INFO = "export.json"      # ... architecture, input normalisation, provenance, cost, file hashes


_UMASK = os.umask(0)
os.umask(_UMASK)


TRAIN = "train"                  # a level's lottery training run
STABILITY = "stability"          # a level's instability measurement (eval stability)


def replicate_dir(exp_dir: Path, replicate: int) -> Path:
    return Path(exp_dir) / f"replicate_{replicate}"


def level_dir(exp_dir: Path, replicate: int, level: int) -> Path:
    return replicate_dir(exp_dir, replicate) / f"level_{level}"


def run_dir(level: Path, reset: str | None = None) -> Path:
    """A level's training run: the lottery's (train/), or its mask re-trained on labels (retrain_<reset>/)."""
    return Path(level) / (TRAIN if reset is None else f"retrain_{reset}")


def random_mask(level: Path, reset: str) -> Path:
    """The mask of a random baseline (retrain_random, retrain_random_adjusted): its own."""
    return run_dir(level, reset) / MASK


def probe_dir(level: Path, data_name: str, fingerprint: str, stage: str | None = None) -> Path:
    """A linear probe, named by the data it reads (wherever that lives) and the features it reads:
    probe_<dataset>[@<stage>]_<fingerprint>."""
    return Path(level) / f"probe_{data_name.split('.')[0]}{'@' + stage if stage else ''}_{fingerprint[:8]}"


def finetune_dir(level: Path, data_name: str, digest: str) -> Path:
    """A fine-tuning on a target dataset: finetune_<dataset>_<hash of its data and training settings>."""
    return Path(level) / f"finetune_{data_name.split('.')[0]}_{digest[:8]}"


def evaluation_dir(level: Path, name: str) -> Path:
    """An evaluation with one result per level, in a folder of its name (sslprune/evaluations.py):
    level_<L>/<name>/. One whose name says more (data, settings) gets a function of its own here."""
    return Path(level) / name


def stability_dir(level: Path) -> Path:
    """A level's instability measurement (eval stability): the second copy's run and the result."""
    return evaluation_dir(level, STABILITY)


def stability_copy(level: Path, copy: int) -> Path:
    """The training run of copy 1 or 2 of a level's ticket, when it is not the level's own run."""
    return stability_dir(level) / f"copy_{copy}"


def number(folder: Path) -> int:
    """replicate_3 -> 3, level_12 -> 12."""
    prefix, _, n = Path(folder).name.rpartition("_")
    if prefix not in ("replicate", "level") or not n.isdigit():
        raise UserError(f"{folder} is no replicate_<r> or level_<L> folder")
    return int(n)


def _numbered(folder: Path) -> bool:
    """replicate_<n> or level_<n> exactly: a folder moved aside (level_2.diverged) is not one."""
    prefix, _, n = folder.name.rpartition("_")
    return folder.is_dir() and prefix in ("replicate", "level") and n.isdigit()


def replicates(exp_dir: Path) -> list[int]:
    """The replicates an experiment has on disk, in order."""
    return sorted(number(p) for p in Path(exp_dir).glob("replicate_*") if _numbered(p))


def levels(exp_dir: Path) -> list[tuple[int, int, Path]]:
    """(replicate, level, folder) of every level on disk, in order."""
    return sorted((number(p.parent), number(p), p) for p in Path(exp_dir).glob("replicate_*/level_*")
                  if _numbered(p) and _numbered(p.parent))


def trained_levels(exp_dir: Path) -> list[tuple[int, int]]:
    """(replicate, level) of the levels whose lottery training is done."""
    return [(r, lv) for r, lv, d in levels(exp_dir) if is_done(run_dir(d))]


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """A level's sub-folder, parsed: what ran there, on what."""
    kind: str                   # train | retrain | probe | finetune | stability
    path: Path
    reset: str | None = None    # retrain: rewind | reinit | random | random_adjusted
    data: str | None = None     # probe, finetune: the dataset's name
    stage: str | None = None    # probe: the backbone module it read, or None (final features)
    digest: str | None = None   # probe: the data's fingerprint; finetune: the settings' hash

    @property
    def mask(self) -> Path:
        """The mask the run trained under: a random baseline's own, else its level's."""
        own = self.path / MASK
        return own if self.kind == "retrain" and self.reset.startswith("random") else self.path.parent / MASK


def evaluations(level: Path) -> list[Evaluation]:
    """Every run and evaluation folder of a level (finished or not), parsed; the inverse of run_dir,
    probe_dir, finetune_dir and stability_dir. Unknown folders are left out."""
    out = []
    for p in sorted(Path(level).iterdir()) if Path(level).is_dir() else []:
        if not p.is_dir():
            continue
        kind, _, rest = p.name.partition("_")
        if p.name in (TRAIN, STABILITY):
            out.append(Evaluation(p.name, p))
        elif kind == "retrain" and rest:
            out.append(Evaluation("retrain", p, reset=rest))
        elif kind == "probe" and "_" in rest:
            what, digest = rest.rsplit("_", 1)
            data, _, stage = what.partition("@")
            out.append(Evaluation("probe", p, data=data, stage=stage or None, digest=digest))
        elif kind == "finetune" and "_" in rest:
            data, digest = rest.rsplit("_", 1)
            out.append(Evaluation("finetune", p, data=data, digest=digest))
    return out


# What may lie where in an experiment folder (describe): files by level of the tree; run folders
# hold RUN_FILES, a stability folder also its copies' runs.
EXPERIMENT_FILES = {CONFIG, LABELLED, ".config.lock"}
REPLICATE_FILES = {INIT, REWIND, PRETRAINED}
LEVEL_FILES = {MASK, DENSITY, COST}
RUN_FILES = {DONE, MODEL, CHECKPOINT, LOG, MASK, DENSITY, COST, "features.safetensors"}
TRACKING_PREFIX = "events.out.tfevents."   # --track tensorboard: event files in the run's folder


def describe(path: Path, exp_dir: Path) -> str:
    """What a path inside an experiment folder is, e.g. 'replicate 1, level 2: retrain (rewind)';
    UserError for anything layout does not name (a stray file, a folder of an unknown kind)."""
    rel = Path(path).relative_to(exp_dir).parts
    lock = rel and rel[-1].startswith(".") and rel[-1].endswith(".lock")
    if not rel or (len(rel) == 1 and (rel[0] in EXPERIMENT_FILES or lock)):
        return "the experiment" if not rel else f"the experiment: {rel[0]}"
    try:
        what = f"replicate {number(Path(rel[0]))}"
        if len(rel) == 1 or (len(rel) == 2 and (rel[1] in REPLICATE_FILES or lock)):
            return what + (f": {rel[1]}" if len(rel) == 2 else "")
        what += f", level {number(Path(rel[1]))}"
    except UserError:
        raise UserError(f"{path}: not a path sslprune's layout names") from None
    if len(rel) == 2 or (len(rel) == 3 and (rel[2] in LEVEL_FILES or lock)):
        return what + (f": {rel[2]}" if len(rel) == 3 else "")
    found = [e for e in evaluations(Path(exp_dir, *rel[:2])) if e.path.name == rel[2]]
    inner = rel[3:]
    if found and found[0].kind == "stability" and inner and inner[0] in ("copy_1", "copy_2"):
        inner = inner[1:]  # a copy's training run
    if not found or len(inner) > 1 or (inner and inner[0] not in RUN_FILES and not inner[0].startswith(TRACKING_PREFIX)):
        raise UserError(f"{path}: not a path sslprune's layout names")
    e = found[0]
    detail = e.reset or e.data or ""
    return f"{what}: {e.kind}{f' ({detail})' if detail else ''}" + (f", {inner[0]}" if inner else "")


def locate(path: Path) -> tuple[Path, int, int | None] | None:
    """(experiment folder, replicate, level or None) of a path inside a run (e.g. a level's
    model.safetensors given as --pretrained), or None when it is not inside one."""
    parts = Path(path).parts
    for i, part in enumerate(parts):
        try:
            replicate = number(Path(part)) if part.startswith("replicate_") else None
        except UserError:
            continue
        if replicate is not None and i > 0:
            level = None
            if i + 1 < len(parts) and parts[i + 1].startswith("level_"):
                try:
                    level = number(Path(parts[i + 1]))
                except UserError:
                    pass
            return Path(*parts[:i]), replicate, level
    return None


def experiment_of(path: Path) -> Path:
    """The experiment folder a path lies in (its parent when it lies in none)."""
    where = locate(path)
    return where[0] if where else Path(path).parent


def run_name(path: Path) -> str:
    """A path's place in its experiment, e.g. `replicate_1/level_2/train` (its name outside one)."""
    where = locate(path)
    return Path(path).relative_to(where[0]).as_posix() if where else Path(path).name


def replicate_lock(exp_dir: Path, replicate: int) -> Path:
    """Held while a replicate's lottery chain runs (sslprune lottery, a sweep's lottery step)."""
    return Path(exp_dir) / f".replicate_{replicate}.lock"


def step_lock(level: Path, step: str) -> Path:
    """Held while one evaluation of a level runs, e.g. step 'retrain_reinit'."""
    return Path(level) / f".{step}.lock"


def sweep_label(kind: str, index: int) -> str:
    """A sweep's name for its index-th probe or fine-tune table in a level (lock and ledger): probe_1."""
    return f"{kind}_{index}"


def sweep_lock(folder: Path, step: str) -> Path:
    """A sweep worker's claim on a step (taken without waiting: a worker that cannot take it moves on).
    The step's own lock (replicate_lock, step_lock) is then taken inside, as by a plain command."""
    return Path(folder) / f".sweep_{step}.lock"


def experiment_lock(exp_dir: Path) -> Path:
    """Held while an experiment's config.json is created or updated."""
    return Path(exp_dir) / ".config.lock"


def is_temporary(path: Path) -> bool:
    """A half-written file of an atomic write (.<name>.*.tmp, made by mkstemp below)."""
    return Path(path).name.startswith(".") and Path(path).name.endswith(".tmp")


def clean_temporaries(folder: Path) -> list[Path]:
    """Remove the half-written temporaries (.<name>.*.tmp) a killed writer left in `folder`; call it
    only under the lock of the step that writes there. Returns what was removed."""
    gone = sorted(p for p in Path(folder).iterdir() if is_temporary(p)) if Path(folder).is_dir() else []
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def step_guard(path: Path):
    """The lock of a step, taken by rank 0 only: under torchrun the N processes of one run are one writer."""
    return file_lock(path) if distributed.is_main() else contextlib.nullcontext(True)


@contextlib.contextmanager
def file_lock(path: Path, wait: bool = True):
    """Exclusive flock on `path`; yields True when taken, False when another process holds it and
    wait is False. The lock dies with the process (kill -9 included): it can never go stale."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def lock_held(path: Path) -> bool:
    """Whether a process holds file_lock(path) now: probed without creating the file or keeping a
    lock (a shared one, taken and dropped at once, only when nobody holds it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # drops the probe's own lock with it
    return False


def _atomic(path: Path, write) -> None:
    """write(tmp_path) then rename over `path`; the temp file lives in the same directory. Under
    several processes only rank 0 writes (the others computed the same thing)."""
    if not distributed.is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # after writing (a writer may re-create the file): every output 0644
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_json(path: Path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
    _atomic(path, write)


def load_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({getattr(e, 'msg', None) or e.reason}); it was truncated or "
                        f"damaged: move it away to recompute that step") from None


def save_text(path: Path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    _atomic(path, write)


def save_bytes(path: Path, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    _atomic(path, write)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(flat, tmp))


def load_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"missing file {path}; re-run the command that writes it")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is truncated or corrupt ({e}); move it away and re-run "
                        f"to recompute it") from None


def save_checkpoint(path: Path, obj: dict) -> None:
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """weights_only=True: a checkpoint never runs code, even one a user was handed. mmap: tensors
    are mapped, not read (for its epoch alone: a ResNet's checkpoint with Adam's moments is ~135 MB)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises RuntimeError/EOFError/UnpicklingError for bad files
        raise UserError(f"{path} is truncated or corrupt ({type(e).__name__}); move it away to "
                        f"resume from the start of that step") from None
    missing = {"fingerprint", "epoch"} - (set(ckpt) if isinstance(ckpt, dict) else set())  # the rest: train.read_checkpoint
    if missing:  # something else saved under this name, or damaged
        raise UserError(f"{path} is no sslprune checkpoint (no {', '.join(sorted(missing))}); move it away to "
                        f"resume from the start of that step")
    return ckpt


def is_done(run_dir: Path) -> bool:
    """A step is done when its done.json exists and reads: a truncated or damaged one is an error
    (load_json says what to do), never "done"."""
    path = Path(run_dir) / DONE
    if not path.exists():
        return False
    if not isinstance(load_json(path), dict):
        raise UserError(f"{path} is damaged (not a JSON object): move it away to recompute that step")
    return True


# Sealing: a finished file's sha256 and size, recorded in the JSON file that marks its step finished
# (done.json for a run's model.safetensors, density.json for a mask), checked on every read.

def seal(*paths: Path) -> dict:
    """{'files': {name: {'sha256', 'size'}}} of files in one folder, to merge into their done-file.
    Only rank 0 writes files (and their done-files): the other ranks seal nothing."""
    if not distributed.is_main():
        return {"files": {}}
    return {"files": {Path(p).name: {"sha256": _sha256(p), "size": os.path.getsize(p)} for p in paths}}


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_seal(path: Path, record: dict | list | None) -> None:
    """`path` against the seal `record` (a done-file's content); files from before sealing pass."""
    files = record.get("files", {}) if isinstance(record, dict) else {}
    sealed = files.get(Path(path).name) if isinstance(files, dict) else files
    if sealed is None:
        return
    path = Path(path)
    if not (isinstance(sealed, dict) and isinstance(sealed.get("size"), int) and isinstance(sealed.get("sha256"), str)):
        raise UserError(f"the seal of {path} in its done-file is damaged ({str(sealed)[:40]!r}); move the folder "
                        f"{path.parent} away and re-run the command that wrote it: that step is recomputed")
    size = path.stat().st_size if path.exists() else None
    same = size == sealed["size"] and _sha256(path) == sealed["sha256"]
    if not same:
        what = "size" if size != sealed["size"] else "sha256"
        raise UserError(f"{path} is truncated or corrupt: its {what} differs from the one recorded when it was "
                        f"written (damaged since); move it away (mv {path} {path}.bad) and re-run the command "
                        f"that wrote it: that step is recomputed")


def load_sealed(path: Path, record: Path) -> dict[str, torch.Tensor]:
    """Tensors of `path`, checked against the seal in the JSON file `record` when there is one."""
    if Path(record).exists():
        check_seal(path, load_json(record))
    return load_tensors(path)


def load_model(run_dir: Path) -> dict[str, torch.Tensor]:
    """A finished run's model.safetensors, checked against its done.json."""
    return load_sealed(Path(run_dir) / MODEL, Path(run_dir) / DONE)


def load_mask(path: Path) -> dict[str, torch.Tensor]:
    """A mask, checked against the density.json beside it (written after it, with its seal)."""
    return load_sealed(path, Path(path).parent / DENSITY)


def load_rewind(exp_dir: Path, replicate: int) -> dict[str, torch.Tensor]:
    """The rewind point, checked against level 0's done.json (which seals it once level 0 is trained)."""
    return load_sealed(replicate_dir(exp_dir, replicate) / REWIND, level_dir(exp_dir, replicate, 0) / "train" / DONE)
