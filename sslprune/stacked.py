"""Many small networks per step: K trainings of one architecture and one schedule run as a single
network, each keeping its own mask, initialisation, optimizer state and data order (the
re-trainings of a level, and of a run's levels and replicates: `--stack K`).

The K networks' parameters and buffers are stacked, (K, ...), and one forward runs them all:
torch.func.vmap over a functional call of one network (a conv over stacked weights becomes one
grouped conv; when the K share their data order, the batch is drawn once and the first conv is a
single conv with K times the filters). The K mean losses are summed, so one backward gives each
network the gradient of its own loss, and Adam or SGD, which act element by element, step the
stacked tensors exactly as K optimizers would. Each network keeps its own run folder in the
format train() writes: per-epoch evaluation, log.jsonl and a resumable checkpoint.pt, then
model.safetensors and done.json.

It matches training one at a time to floating-point tolerance, not bit for bit (a grouped conv
sums in another order): tests/test_stacked.py checks weights, batch-norm statistics and Adam
state. A stacked checkpoint therefore resumes only stacked. Where stacking does not apply
(why_not) the networks train one at a time. Whether it pays depends on the machine and the
network size: benchmarks/many_networks.py.
"""
from __future__ import annotations

import copy
import dataclasses
import sys
import time
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, vmap
from tqdm import tqdm

from . import distributed, layout, tracking
from .config import Data as DataConfig
from .config import Train as TrainConfig
from .data import Dataset, Split
from .data.augment import Normalize
from .errors import UserError
from .pruning import Mask, apply_mask, prunable
from .runtime import CPU, Runtime
from .tasks import Batch, Task
from .train import (TrainingStep, check_finite, draw_images, evaluate, finish, fingerprint, learning_rate,
                    load_weights, make_optimizer, read_checkpoint, save_epoch, train, weights)


@dataclass
class Job:
    """One training of a stack: what train() would be called with."""
    backbone: nn.Module
    task: Task
    mask: Mask
    out: Path
    seed: int           # data order and augmentation


def why_not(jobs: list[Job], data: Dataset, cfg: TrainConfig, runtime: Runtime) -> str:
    """Why these trainings cannot run as one ("" when they can)."""
    if distributed.world() > 1:
        return "several processes train one network"
    if not isinstance(data.train, Split):
        return "--stream"
    if cfg.optimizer not in ("adam", "sgd"):
        return f"--optimizer {cfg.optimizer} is not element-wise"
    if runtime.compile:
        return "--compile"
    if cfg.accumulate > 1:
        return "--accumulate"
    if runtime.track in ("wandb", "mlflow"):
        return f"--track {runtime.track} follows one active run per process"
    if not all(j.task.stackable for j in jobs):
        return "the task's step draws randomness or keeps state"
    if any(isinstance(m, nn.modules.dropout._DropoutNd) for j in jobs for m in j.backbone.modules()):
        return "dropout draws from torch's global generator, one per process"
    if any(getattr(j.backbone, "no_weight_decay", list)() for j in jobs):
        return "some parameters train without weight decay"

    def shapes(j):
        return [(k, v.shape, v.dtype) for k, v in TrainingStep(j.backbone, j.task).state_dict().items()]
    if any(shapes(j) != shapes(jobs[0]) for j in jobs[1:]) or len({j.task.identity() for j in jobs}) > 1:
        return "different networks or tasks"
    return ""


def train_stacked(jobs: list[Job], data: Dataset, cfg: TrainConfig, aug: DataConfig, runtime: Runtime = CPU,
                  progress: bool = True) -> list[dict]:
    """Train every job, as one stack where it can (why_not) and one at a time where not; returns
    each one's final metrics, in order. Finished jobs are read back. Killed ones resume as they
    started: a stacked checkpoint in a stack of those at the same epoch (K may differ from the
    killed stack's: results then agree to rounding), a one-at-a-time checkpoint one at a time.
    A network that diverges stops alone (train.check_finite, its last good checkpoint kept): the
    others of its stack train to the end, then the divergence is the error."""
    pending = [j for j in jobs if not layout.is_done(j.out)]
    started = {id(j): _stacked_epoch(j.out) for j in pending}   # None: started one at a time
    stackable = [j for j in pending if started[id(j)] is not None]
    diverged: dict[Path, str] = {}
    if stackable and not why_not(stackable, data, cfg, runtime):
        # NCHW: vmap cannot run channels_last (torch 2.x: "NYI: querying is_contiguous inside of vmap")
        rt = dataclasses.replace(runtime.resolved(), channels_last=False)
        n_train = len(data.train.labels)
        for epoch, group in groupby(sorted(stackable, key=lambda j: started[id(j)]), key=lambda j: started[id(j)]):
            group = list(group)
            if len(group) > 1 or epoch > 0:   # one network that never started stacked trains alone
                resumed = [read_checkpoint(j.out / layout.CHECKPOINT, _computation(j, cfg, aug, n_train, rt))
                           for j in group]
                diverged |= _train_stack(group, resumed, data, cfg, aug, rt, progress)
    if diverged:   # the others of their stacks trained on, and are saved
        first, *more = diverged.values()
        raise UserError(first + (f" ({len(more)} more network(s) of this stack diverged too)" if more else ""))
    # one at a time: the rest, and reading back the finished (train() loads a done run)
    return [train(j.backbone, j.task, data, cfg, aug, j.mask, j.out, j.seed, runtime, progress=progress)
            for j in jobs]


def _stacked_epoch(out: Path) -> int | None:
    """The epoch a stacked checkpoint in `out` reached; 0 without a checkpoint; None for one
    written one at a time."""
    path = out / layout.CHECKPOINT
    if not path.exists():
        return 0
    ckpt = layout.load_checkpoint(path)
    return ckpt["epoch"] if ckpt.get("fingerprint", {}).get("stacked") else None


def stack(nets: list[nn.Module]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], nn.Module]:
    """K networks of one architecture -> their parameters as stacked leaf tensors (K, ...) in the
    order of parameters(), their buffers stacked, and a weightless copy to run them through with
    torch.func.functional_call under vmap."""
    params = {n: torch.stack([dict(net.named_parameters())[n].detach() for net in nets]).requires_grad_()
              for n, _ in nets[0].named_parameters()}
    buffers = {n: torch.stack([dict(net.named_buffers())[n] for net in nets]) for n, _ in nets[0].named_buffers()}
    return params, buffers, copy.deepcopy(nets[0]).to("meta")


def _computation(job: Job, cfg: TrainConfig, aug: DataConfig, n_train: int, rt: Runtime) -> dict:
    """A stacked training's fingerprint: one-at-a-time's, marked stacked (it rounds differently)."""
    return fingerprint(job.seed, cfg, aug, n_train, job.task, rt) | {"stacked": True}


def _train_stack(jobs: list[Job], resumed: list[dict | None], data: Dataset, cfg: TrainConfig,
                 aug: DataConfig, rt: Runtime, progress: bool) -> dict[Path, str]:
    """train()'s loop for K networks starting at the same epoch, on in-memory data. Returns the
    networks that diverged, {run folder: check_finite's message}: each is neither evaluated nor
    saved from its divergence on, while the others train on (its values stay in its own slice of
    the stack: no network's gradient or statistics read another's)."""
    device, k = rt.device, len(jobs)
    train_x, train_y = data.train.images.to(device), data.train.labels.to(device)  # (N, 3, H, W) uint8, (N,)
    test_x, test_y = data.test.images.to(device), data.test.labels.to(device)
    normalize = Normalize(*data.channel_stats(), memory_format=rt.memory_format).to(device)
    sampler = jobs[0].task.sampler
    per_epoch = sampler.steps_per_epoch(train_y, cfg.batch_size)
    nets = []
    for j, ckpt in zip(jobs, resumed):
        layout.clean_temporaries(j.out)
        j.backbone.to(device, memory_format=rt.memory_format), j.task.to(device)
        apply_mask(j.backbone, j.mask)
        if ckpt is not None:
            load_weights(j.backbone, j.task, ckpt["weights"])
        nets.append(TrainingStep(j.backbone, j.task).train())

    params, buffers, template = stack(nets)
    pruned = [n for n in prunable(jobs[0].backbone) if not all(bool(j.mask[n].all()) for j in jobs)]
    kept = {f"backbone.{n}": torch.stack([j.mask[n] for j in jobs]).to(device, params[f"backbone.{n}"].dtype)
            for n in pruned}                                                   # (K, ...) 0/1

    optimizer = make_optimizer(cfg, list(params.values()))   # element-wise: K optimizers in one
    shared = len({j.seed for j in jobs}) == 1    # one data order: the batch is drawn once for all K
    generators = [torch.Generator(device=device).manual_seed(j.seed) for j in (jobs[:1] if shared else jobs)]
    torch.manual_seed(jobs[0].seed)
    start_epoch, histories = 0, [[] for _ in jobs]
    cuda = torch.device(device).type == "cuda"
    if resumed[0] is not None:
        optimizer.load_state_dict(_stack_state([c["optimizer"] for c in resumed]))
        for g, c in zip(generators, resumed):
            g.set_state(c["generator"])
        torch.set_rng_state(resumed[0]["torch_rng"])
        if cuda:
            torch.cuda.set_rng_state(resumed[0]["cuda_rng"], device)
        start_epoch, histories = resumed[0]["epoch"], [c["history"] for c in resumed]

    def one(p, b, x, y):   # one network's step: its parameters, buffers, images (B, 3, H, W), labels (B,)
        loss, correct, _ = functional_call(template, (p, b), (Batch(x, y, None, None), normalize))
        return loss, correct
    forward = vmap(one, in_dims=(0, 0, None, None) if shared else 0)

    shown = progress and distributed.is_main()
    lines = shown and not sys.stderr.isatty()
    bar = tqdm(range(start_epoch, cfg.epochs), desc=f"{k} stacked", disable=None if shown else True,
               leave=False, initial=start_epoch, total=cfg.epochs)
    trackers = [tracking.start(rt.track, j.out) for j in jobs]
    diverged: dict[Path, str] = {}
    for epoch in bar:
        t0 = time.perf_counter()
        orders = [sampler.epoch_batches(train_y, cfg.batch_size, g) for g in generators]  # each (per_epoch, B)
        loss_sum = torch.zeros(k, device=device)
        correct = torch.zeros(k, device=device, dtype=torch.long)
        first_bad = torch.full((k,), -1, device=device, dtype=torch.long)
        count = 0
        for i in range(per_epoch):
            step = epoch * per_epoch + i
            x = torch.stack([draw_images(train_x, o[i], aug, g) for o, g in zip(orders, generators)])  # (K or 1, B, 3, H, W)
            y = torch.stack([train_y[o[i]] for o in orders])                                           # (K or 1, B)
            if shared:
                x, y = x[0], y[0]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step, per_epoch)
            with rt.autocast():
                loss, c = forward(params, buffers, x, y)             # (K,), (K,)
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()                                   # network k's gradient is its own loss's
            grads = [(params[n].grad, m) for n, m in kept.items() if params[n].grad is not None]
            if grads:                                               # as train(): pruned gradients out first
                torch._foreach_mul_([g for g, _ in grads], [m for _, m in grads])
            optimizer.step()
            if kept:                                                # pruned weights stay exactly 0
                with torch.no_grad():
                    torch._foreach_mul_([params[n] for n in kept], list(kept.values()))
            n = y.shape[-1]
            loss_sum += loss.detach() * n
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
            correct += c
            count += n
        t1 = time.perf_counter()

        with torch.no_grad():   # back into each network's own modules, to evaluate and save them
            for i, net in enumerate(nets):
                for n, t in net.named_parameters():
                    t.copy_(params[n][i])
                for n, t in net.named_buffers():
                    t.copy_(buffers[n][i])
        train_loss = (loss_sum / count).tolist()
        state, b = optimizer.state_dict(), orders[0].shape[1]
        for i, j in enumerate(jobs):
            if j.out in diverged:
                continue
            t2 = time.perf_counter()
            try:
                check_finite(j.out, epoch + 1, int(first_bad[i]), train_loss[i], list(weights(j.backbone, j.task).values()))
                with rt.autocast():
                    test = evaluate(j.backbone, j.task, test_x, test_y, normalize,
                                    b if j.task.batch_metric else max(b, 256), train_labels=train_y)
                check_finite(j.out, epoch + 1, -1, sum(v for v in test.values() if isinstance(v, float)), [])
            except UserError as e:
                diverged[j.out] = str(e)
                continue
            j.backbone.train(), j.task.train()
            histories[i].append({"epoch": epoch + 1, "step": (epoch + 1) * per_epoch, "lr": optimizer.param_groups[0]["lr"],
                                 "train_loss": train_loss[i], "train_acc": float(correct[i]) / count,
                                 **{f"test_{m}": v for m, v in test.items()},
                                 "train_seconds": (t1 - t0) / k, "eval_seconds": time.perf_counter() - t2, "stacked": k})
            if lines:
                tracking.epoch_line(j.out, histories[i][-1], cfg.epochs, j.task.metric)
            if trackers[i] is not None:
                trackers[i].log(tracking.metrics(histories[i][-1]), step=epoch + 1)
            save_epoch(j.out, histories[i], {
                "fingerprint": _computation(j, cfg, aug, len(train_y), rt), "epoch": epoch + 1,
                "history": histories[i], "weights": weights(j.backbone, j.task),
                "optimizer": _unstack_state(state, i), "generator": generators[0 if shared else i].get_state(),
                "torch_rng": torch.get_rng_state(), **({"cuda_rng": torch.cuda.get_rng_state(device)} if cuda else {})})
        live = [loss for j, loss in zip(jobs, train_loss) if j.out not in diverged]
        if not live:
            break
        bar.set_postfix(loss=f"{sum(live) / len(live):.3f}")

    for i, j in enumerate(jobs):
        if trackers[i] is not None:
            trackers[i].close()
        if j.out not in diverged:
            finish(j.out, weights(j.backbone, j.task), histories[i], cfg.epochs, j.seed)
    return diverged


def _stack_state(states: list[dict]) -> dict:
    """K optimizers' state_dicts -> the stacked optimizer's: per-parameter tensors stacked, (K, ...);
    the step count (the same in all K) kept once."""
    def stacked(key, values):
        return values[0] if key == "step" or values[0] is None else torch.stack(values)
    return {"state": {p: {key: stacked(key, [s["state"][p][key] for s in states]) for key in entry}
                      for p, entry in states[0]["state"].items()},
            "param_groups": states[0]["param_groups"]}


def _unstack_state(state: dict, i: int) -> dict:
    """Network i's optimizer state_dict, as its own optimizer would have written it."""
    return {"state": {p: {key: v if key == "step" or v is None else v[i].clone() for key, v in entry.items()}
                      for p, entry in state["state"].items()},
            "param_groups": copy.deepcopy(state["param_groups"])}
