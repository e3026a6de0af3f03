"""The training loop: one plain function you can read top to bottom.

Resumable: after every epoch it writes checkpoint.pt (weights, task state, optimizer, epoch, the
data generator's and torch's RNG states, the metric history). Re-running the same call resumes
from it and gives bit-identical weights to an uninterrupted run. When the run is finished it
writes model.safetensors and then done.json; a finished run is loaded, never re-trained.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import distributed, layout, tracking
from .config import Data as DataConfig
from .config import Train as TrainConfig
from .config import non_default, parse_rewind
from .data import Dataset, Split
from .data.augment import Normalize, batch_crop, batch_flip_lr
from .data.stream import Stream
from .errors import UserError
from .lars import LARS
from .pruning import Mask, MaskEnforcer, apply_mask
from .runtime import CPU, Runtime
from .tasks import Batch, Task


def rewind_step(rewind: str, per_epoch: int) -> int:
    """The rewind point as a number of updates of the dense training."""
    k, unit = parse_rewind(rewind)
    return k * per_epoch if unit == "ep" else k


def learning_rate(cfg: TrainConfig, step: int, per_epoch: int) -> float:
    """lr before update `step` (0-based): linear warm-up, then constant, step or cosine decay."""
    total, warm = cfg.epochs * per_epoch, cfg.warmup_epochs * per_epoch
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "step":
        epoch = step // per_epoch
        return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    return cfg.lr


def make_optimizer(cfg: TrainConfig, params, no_decay=()) -> torch.optim.Optimizer:
    """no_decay: parameters trained without weight decay (a gated network's gates), in a second group."""
    params = list(params)
    if no_decay:
        skip = {id(p) for p in no_decay}
        params = [{"params": [p for p in params if id(p) not in skip]},
                  {"params": [p for p in params if id(p) in skip], "weight_decay": 0.0}]
    if cfg.optimizer == "adam":  # weight_decay here is L2 added to the gradient (Adam + L2)
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "lars":
        return LARS(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def weights(backbone: nn.Module, task: Task) -> dict[str, torch.Tensor]:
    """Everything a trained network is: backbone state and task state (head, BN buffers)."""
    return {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
            **{f"task.{k}": v for k, v in task.state_dict().items()}}


def load_weights(backbone: nn.Module, task: Task | None, tensors: dict[str, torch.Tensor]) -> None:
    """Strict: every key must match. With task=None only the backbone is loaded."""
    def part(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        backbone.load_state_dict(part("backbone."), strict=True)
        if task is not None:
            task.load_state_dict(part("task."), strict=True)
    except RuntimeError as e:
        raise UserError(f"saved weights do not match the model ({str(e).splitlines()[0]}); "
                        f"check --model/--task against the run's config.json") from None


def check_finite(out: Path, epoch: int, bad_step: int, loss: float, tensors: list[torch.Tensor]) -> None:
    """A diverged run stops here, before its epoch is saved: the last checkpoint on disk is the last
    good epoch, and nothing non-finite is ever written as a result. `tensors`: everything the network
    is (batch-norm statistics too: they can overflow while the loss stays finite)."""
    finite_weights = all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
    if math.isfinite(loss) and finite_weights:
        return
    where = "/".join(Path(out).parts[-3:])
    what = (f"the loss became non-finite at step {bad_step + 1}" if bad_step >= 0 else
            "the weights became non-finite" if not finite_weights else "the test metrics are non-finite")
    raise UserError(f"training diverged in {where}, epoch {epoch}: {what}; nothing of this epoch was "
                    f"saved (the last good checkpoint is kept); lower --lr (or --momentum), which makes a "
                    f"new experiment, and run again")


def evaluate(backbone: nn.Module, task: Task, images: torch.Tensor, labels: torch.Tensor, normalize,
             batch_size: int, train_labels: torch.Tensor) -> dict:
    """The task's metrics on a held-out split (Task.evaluate: batch-norm in eval mode, fixed views)."""
    return task.evaluate(backbone, images, labels, normalize, batch_size, train_labels=train_labels)


def fingerprint(seed: int, cfg: TrainConfig, aug: DataConfig, n_train: int, task: Task, rt: Runtime) -> dict:
    """What defines a training's computation: a resumed run must match it (RNG streams and rounding
    differ between devices and runtimes)."""
    return {"seed": seed, "train": non_default(cfg), "data": non_default(aug), "n_train": n_train,
            "task": task.identity(), **rt.fingerprint(),
            # LARS steps changed when pruned gradients were first zeroed: its older checkpoints are not resumed
            **({"pruned_gradients": "zeroed"} if cfg.optimizer == "lars" else {})}


def draw_images(train_x: torch.Tensor, idx: torch.Tensor, aug: DataConfig, generator: torch.Generator) -> torch.Tensor:
    """A batch of in-memory training images, (B,) rows -> (B, 3, H, W) uint8, cropped and flipped."""
    x = train_x[idx]
    if aug.crop_pad:
        x = batch_crop(x, aug.crop_pad, generator)
    if aug.flip:
        x = batch_flip_lr(x, generator)
    return x


def read_checkpoint(ckpt_path: Path, fingerprint: dict) -> dict | None:
    """The checkpoint a killed run left, checked against the computation resuming it; None if none."""
    if not ckpt_path.exists():
        return None
    ckpt = layout.load_checkpoint(ckpt_path)
    if "cfg" in ckpt["fingerprint"]:
        raise UserError(f"{ckpt_path} was written by an older sslprune, which this one does not resume; "
                        f"finish it with that version, or move it away (its epochs are trained again; "
                        f"finished levels are kept)")
    if ckpt["fingerprint"] != fingerprint:
        raise UserError(f"{ckpt_path} belongs to a different configuration or runtime (device, precision, "
                        f"memory format, compile, stacking); move {ckpt_path.parent} away or resume with the "
                        f"ones that wrote it")
    missing = {"history", "weights", "optimizer", "generator", "torch_rng"} - set(ckpt)
    if missing:
        raise UserError(f"{ckpt_path} is no sslprune checkpoint (no {', '.join(sorted(missing))}); move it away to "
                        f"resume from the start of that step")
    return ckpt


def save_epoch(out: Path, history: list[dict], state: dict) -> None:
    """The end of an epoch on disk: log.jsonl, then checkpoint.pt (`state`: what resuming reads)."""
    layout.save_text(out / layout.LOG, "".join(json.dumps(h, sort_keys=True) + "\n" for h in history))
    layout.save_checkpoint(out / layout.CHECKPOINT, state)


def finish(out: Path, tensors: dict[str, torch.Tensor], history: list[dict], epochs: int, seed: int,
           also_sealed: tuple[Path, ...] = ()) -> dict:
    """A finished run: model.safetensors, sealed (with `also_sealed`, e.g. the rewind point), then
    done.json last (it marks the run done); the checkpoint goes. Returns the final metrics."""
    final = {**history[-1], "epochs": epochs, "seed": seed}
    layout.save_tensors(out / layout.MODEL, tensors)
    final |= layout.seal(out / layout.MODEL, *also_sealed)
    layout.save_json(out / layout.DONE, final)
    if distributed.is_main():
        (out / layout.CHECKPOINT).unlink()  # model.safetensors now holds everything the finished run is
    return final


def micro_batches(width: int, parts: int) -> list[slice | None]:
    """The rows of a (width,) global batch this process trains on, per micro-batch: --accumulate's
    `parts` equal consecutive parts, of which N processes each take 1/N, so (synchronised)
    batch-norm normalises one whole part however many processes share it. [rows] for one part."""
    if parts == 1:
        return [distributed.rows(width)]  # None on one process: the whole batch
    n, r = distributed.world(), distributed.rank()
    if width % (parts * n):
        raise UserError(f"--accumulate {parts} on {n} process(es) does not split the {width} images of a batch "
                        f"into equal parts; pass a --batch-size that divides by {parts * n}")
    part, share = width // parts, width // (parts * n)
    return [slice(k * part + r * share, k * part + (r + 1) * share) for k in range(parts)]


class TrainingStep(nn.Module):
    """Backbone and task as one module whose forward is a training step (Task.step), so that
    DistributedDataParallel sees every parameter a step uses."""

    def __init__(self, backbone: nn.Module, task: Task):
        super().__init__()
        self.backbone, self.task = backbone, task

    def forward(self, batch: Batch, normalize) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.task.step(self.backbone, batch, normalize)


def train(backbone: nn.Module, task: Task, data: Dataset, cfg: TrainConfig, aug: DataConfig,
          mask: Mask, out: Path, seed: int, runtime: Runtime = CPU, snapshot: tuple[int, Path] | None = None,
          progress: bool = True) -> dict:
    """Train backbone + task head under `mask` into directory `out`; return the final metrics.

    snapshot=(k, path) saves the weights after k updates (the rewind point; k=0 is the init).
    runtime: device, memory format, precision, compile (sslprune.runtime)."""
    out = Path(out)
    if layout.is_done(out):
        load_weights(backbone, task, layout.load_model(out))
        return layout.load_json(out / layout.DONE)
    if distributed.is_main():  # callers hold this step's lock: a temporary here is a killed writer's
        layout.clean_temporaries(out)

    rt = runtime.resolved()
    device = rt.device
    backbone.to(device, memory_format=rt.memory_format), task.to(device)
    stream = None
    if isinstance(data.train, Split):
        train_x = data.train.images.to(device)                       # (N, 3, H, W) uint8, on the device
    else:  # --stream: on disk, decoded ahead of training by DataLoader workers
        stream = Stream(data.train, aug.flip, seed, rt.loader_workers, pin_memory=torch.device(device).type == "cuda")
    train_y = data.train.labels.to(device)
    test_x, test_y = data.test.images.to(device), data.test.labels.to(device)
    normalize = Normalize(*data.channel_stats(), memory_format=rt.memory_format).to(device)
    per_epoch = task.sampler.steps_per_epoch(train_y, cfg.batch_size)

    if snapshot and snapshot[0] > cfg.epochs * per_epoch:
        raise UserError(f"rewind point {snapshot[0]} updates lies past the end of training "
                        f"({cfg.epochs * per_epoch} updates); choose an earlier --rewind")
    width = task.sampler.batch_width(train_y, cfg.batch_size)        # what epoch_batches draws
    if distributed.world() > 1:  # N processes, one run: see sslprune/distributed.py
        distributed.check_batch(width)
        distributed.sync_batchnorm(backbone, device), distributed.sync_batchnorm(task, device)
    parts = micro_batches(width, cfg.accumulate)  # this process's rows of each part; unequal parts refused here
    apply_mask(backbone, mask)
    enforce_mask = MaskEnforcer(backbone, mask)
    params = [*backbone.parameters(), *task.parameters()]
    optimizer = make_optimizer(cfg, params, getattr(backbone, "no_weight_decay", list)())
    generator = torch.Generator(device=device).manual_seed(seed)   # data order and augmentation
    torch.manual_seed(seed)                                        # anything else random (dropout)
    start_epoch, history = 0, []

    computation = fingerprint(seed, cfg, aug, len(train_y), task, rt)
    cuda = torch.device(device).type == "cuda"
    if rt.compile:  # compiles the backbone's forward in place: state_dict keys stay the same
        backbone.compile()
    step_of = TrainingStep(backbone, task)
    if distributed.world() > 1:  # gradients averaged over ranks, overlapped with backward
        step_of = distributed.data_parallel(step_of, device)
    ckpt = read_checkpoint(out / layout.CHECKPOINT, computation)
    if ckpt is not None:
        load_weights(backbone, task, ckpt["weights"])
        optimizer.load_state_dict(ckpt["optimizer"])
        generator.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        if cuda:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        start_epoch, history = ckpt["epoch"], ckpt["history"]
    if snapshot and snapshot[0] == 0 and start_epoch == 0:
        layout.save_tensors(snapshot[1], weights(backbone, task))

    # A bar on a terminal; without one (batch jobs, `2> log.txt`) a line per epoch. log.jsonl has it all.
    shown = progress and distributed.is_main()
    lines = shown and not sys.stderr.isatty()
    bar = tqdm(range(start_epoch, cfg.epochs), desc=layout.run_name(out), disable=None if shown else True,
               leave=False, initial=start_epoch, total=cfg.epochs)
    tracker = tracking.start(rt.track, out) if distributed.is_main() else None
    for epoch in bar:
        backbone.train(), task.train()
        t0 = time.perf_counter()
        order = task.sampler.epoch_batches(train_y, cfg.batch_size, generator)  # (per_epoch, B)
        loaded = stream.epoch(order, epoch, distributed.rows(width)) if stream else None  # N processes: B/N each
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        first_bad = torch.full((), -1, device=device, dtype=torch.long)  # first step with a non-finite loss
        count = 0
        for i in range(per_epoch):
            step = epoch * per_epoch + i
            idx = order[i]
            if stream is None:
                x = draw_images(train_x, idx, aug, generator)       # (B, 3, H, W) uint8
            else:  # cropped and flipped by the workers: this process's rows, gathered to the batch
                x = distributed.gather(next(loaded).to(device, non_blocking=True))
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step, per_epoch)
            optimizer.zero_grad(set_to_none=True)
            # --accumulate: the parts' gradients sum in .grad. N processes: DDP averages each part's
            # as it comes (the sum of averages is the average of sums); no_sync() would save those
            # all-reduces but breaks under static_graph (pytorch/pytorch#143580, #187732)
            for part in parts:
                with rt.autocast():
                    # N processes: the whole batch, and the rows this one trains on (B/N, or its share of a part)
                    loss, c, n = step_of(Batch(x, train_y[idx], idx, generator, part, epoch / cfg.epochs), normalize)
                (loss / len(parts)).backward()                      # N processes: DDP averages the gradients
                loss_sum += loss.detach() * n
                # on the device, no sync: the epoch's end reads it
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
                correct += c
                count += n
            enforce_mask.gradients()                                # LARS: no pruned weight's gradient in a layer's norm
            optimizer.step()
            enforce_mask()                                          # pruned weights stay exactly 0
            if snapshot and step + 1 == snapshot[0]:  # the rewind point: never a diverged one
                check_finite(out, epoch + 1, int(first_bad), float(loss_sum), list(weights(backbone, task).values()))
                layout.save_tensors(snapshot[1], weights(backbone, task))
        loss_sum, correct, count = distributed.sum_over_ranks(loss_sum, correct, torch.tensor(count))
        train_loss, train_acc = float(loss_sum) / float(count), float(correct) / float(count)  # one sync per epoch
        t1 = time.perf_counter()
        check_finite(out, epoch + 1, int(first_bad), train_loss, list(weights(backbone, task).values()))
        batch = order.shape[1]
        with rt.autocast():
            test = evaluate(backbone, task, test_x, test_y, normalize,
                            batch if task.batch_metric else max(batch, 256), train_labels=train_y)
        check_finite(out, epoch + 1, -1, sum(v for v in test.values() if isinstance(v, float)), [])
        history.append({"epoch": epoch + 1, "step": (epoch + 1) * per_epoch,
                        "lr": optimizer.param_groups[0]["lr"], "train_loss": train_loss,
                        "train_acc": train_acc, **{f"test_{k}": v for k, v in test.items()},
                        "train_seconds": t1 - t0, "eval_seconds": time.perf_counter() - t1})
        bar.set_postfix(loss=f"{train_loss:.3f}", test_acc=f"{test['acc']:.3f}")
        if lines:
            tracking.epoch_line(out, history[-1], cfg.epochs, task.metric)
        if tracker is not None:
            tracker.log(tracking.metrics(history[-1]), step=epoch + 1)
        save_epoch(out, history, {
            "fingerprint": computation, "epoch": epoch + 1, "history": history,
            "weights": weights(backbone, task), "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
            **({"cuda_rng": torch.cuda.get_rng_state(device)} if cuda else {})})

    if tracker is not None:
        tracker.close()
    final = finish(out, weights(backbone, task), history, cfg.epochs, seed,
                   (snapshot[1],) if snapshot else ())  # the rewind point is sealed too
    distributed.barrier()   # the other ranks read these files next
    return final
