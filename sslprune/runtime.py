"""How a run executes, as opposed to what it computes: device, memory format, precision, compile,
and the number of processes decoding streamed images.

None of these enter the experiment's name (the same experiment can run on a laptop or a GPU), but
they change floating-point results, so a training run records them in its checkpoint and refuses
to resume under different ones.

Defaults ("auto") follow benchmarks/train_speed.py on each device:
- channels_last: on for CUDA and CPU (training 1.2-1.5x faster than NCHW on the 2-core AVX-512
  CPU of benchmarks/RESULTS-cpu-2core.txt; tensor cores want NHWC);
- precision: bf16 autocast on a CUDA GPU that supports it, fp32 on every CPU. On a CPU with
  AVX512-BF16 units bf16 trained 1.6-1.9x faster (same file), and without them it is reported ~50x
  slower; it stays opt-in there because CPU runs are where results get compared across machines
  (tests, demos, reproductions), and a default that depended on CPU flags would give the same
  command different numerics on different laptops;
- compile: off (its compile time is paid by the run it serves; opt in for long runs);
- track: where per-epoch metrics also go (sslprune/tracking.py); never part of the fingerprint;
- stack: re-trainings trained as one network, up to this many at once (sslprune/stacked.py); 0 or 1:
  one at a time. Results match one at a time to floating-point tolerance, not bit for bit, so a
  stacked training records it in its checkpoint (stacked.py) and resumes only stacked;
- loader_workers (--stream only): the CPUs of this process, shared between the local training
  processes, minus one for training, at most 8. It never changes results (sslprune/data/stream.py),
  so it is not part of the fingerprint.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Runtime:
    device: str = "cpu"
    channels_last: bool | None = None   # None = the device's default (see above)
    precision: str = "auto"             # auto | fp32 | bf16 (autocast for forward and loss)
    compile: bool = False               # torch.compile the backbone's forward
    loader_workers: int | None = None   # --stream: decoding processes (None = see above; 0 = in this one)
    track: str = ""                     # experiment tracking: tensorboard | wandb | mlflow ("" = off)
    stack: int = 0                      # re-trainings trained as one, up to this many (0, 1: one at a time)

    def resolved(self) -> "Runtime":
        """Every 'auto' replaced by the device's default; errors for impossible asks."""
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown --precision '{self.precision}'; choose one of: {', '.join(PRECISIONS)}")
        cuda = torch.device(self.device).type == "cuda"
        precision = self.precision
        if precision == "auto":
            precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
        channels_last = True if self.channels_last is None else self.channels_last
        if self.loader_workers is not None and self.loader_workers < 0:
            raise UserError(f"--loader-workers must be >= 0 (0 = decode in the training process), got {self.loader_workers}")
        if self.loader_workers is None:
            from .data.stream import default_workers
            workers = default_workers()
        else:
            workers = self.loader_workers
        if self.stack < 0:
            raise UserError(f"--stack must be >= 0 (0 or 1 = one network at a time), got {self.stack}")
        from .tracking import check
        check(self.track)
        return Runtime(self.device, channels_last, precision, self.compile, workers, self.track, self.stack)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self):
        """Mixed precision for forward and loss (weights and optimizer stay fp32)."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16)

    def fingerprint(self) -> dict:
        """What changes floating-point results: a resumed run must use the same."""
        r = self.resolved()
        return {"device": torch.device(r.device).type, "channels_last": r.channels_last,
                "precision": r.precision, "compile": r.compile}


CPU = Runtime()
