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
PRETRAINED = "pretrained.json"   # replicate_<r>/: the weights file (and its sha256) level 0 started from
REWIND = "rewind.safetensors"
COST = "cost.json"               # beside a mask: params, MACs and measured latency of its compact network
EXPORT_MODEL = MODEL             # an export folder: the standalone network's tensors (torchvision-style keys)
EXPORT_ONNX = "model.onnx"       # ... the same network for onnxruntime
EXPORT_INFO = "export.json"      # ... architecture, input normalisation, provenance, cost, file hashes


_UMASK = os.umask(0)
os.umask(_UMASK)


def replicate_dir(exp_dir: Path, replicate: int) -> Path:
    return Path(exp_dir) / f"replicate_{replicate}"


def level_dir(exp_dir: Path, replicate: int, level: int) -> Path:
    return replicate_dir(exp_dir, replicate) / f"level_{level}"


def run_dir(level: Path, reset: str | None = None) -> Path:
    """A level's training run: the lottery's (train/), or its mask re-trained on labels (retrain_<reset>/)."""
    return Path(level) / ("train" if reset is None else f"retrain_{reset}")


def stability_dir(level: Path) -> Path:
    """A level's instability measurement (eval stability): the second copy's run and the result."""
    return Path(level) / "stability"


def replicate_lock(exp_dir: Path, replicate: int) -> Path:
    """Held while a replicate's lottery chain runs (sslprune lottery, a sweep's lottery step)."""
    return Path(exp_dir) / f".replicate_{replicate}.lock"


def step_lock(level: Path, step: str) -> Path:
    """Held while one evaluation of a level runs, e.g. step 'retrain_reinit'."""
    return Path(level) / f".{step}.lock"


def sweep_lock(folder: Path, step: str) -> Path:
    """A sweep worker's claim on a step (taken without waiting: a worker that cannot take it moves on).
    The step's own lock (replicate_lock, step_lock) is then taken inside, as by a plain command."""
    return Path(folder) / f".sweep_{step}.lock"


def experiment_lock(exp_dir: Path) -> Path:
    """Held while an experiment's config.json is created or updated."""
    return Path(exp_dir) / ".config.lock"


def clean_temporaries(folder: Path) -> list[Path]:
    """Remove the half-written temporaries (.<name>.*.tmp) a killed writer left in `folder`; call it
    only under the lock of the step that writes there. Returns what was removed."""
    gone = sorted(Path(folder).glob(".*.tmp")) if Path(folder).is_dir() else []
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


def load_checkpoint(path: Path) -> dict:
    """weights_only=True: a checkpoint never runs code, even one a user was handed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError/EOFError/UnpicklingError for bad files
        raise UserError(f"{path} is truncated or corrupt ({type(e).__name__}); move it away to "
                        f"resume from the start of that step") from None


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
    sealed = record.get("files", {}).get(Path(path).name) if isinstance(record, dict) else None
    if sealed is None:
        return
    path = Path(path)
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
