"""Data-parallel training on N processes: `torchrun --nproc_per_node N -m sslprune lottery ...`.

The design keeps every rank doing the single-process computation on its share of each batch, so a
run on N processes matches a run on one with the same global batch, to floating-point tolerance:
- every rank holds the data (in memory; with --stream each decodes its rows of every batch and
  the rows are all-gathered) and draws the same global batch and the same augmentation (one seed);
  rank r trains on its contiguous 1/N of it (the global batch must divide by N). Random views
  (Exemplar's) are drawn for the whole batch too, so every rank draws what one process would;
- gradients are averaged over ranks by PyTorch's DistributedDataParallel (`data_parallel`): bucketed
  all-reduces that overlap with backward (the mean of equal shards' mean losses is the global mean
  loss); every rank then takes the same optimizer step;
- batch-norm statistics are reduced over ranks, so normalisation sees the global batch: by
  torch.nn.SyncBatchNorm on CUDA, and on CPU (gloo, which torch.nn.SyncBatchNorm refuses) by
  SyncBatchNorm2d / 1d below, on a process group of their own so that their all-reduces, issued
  inside backward, never interleave with DDP's;
- masks are computed by every rank from the same files, hence identical; only rank 0 writes files
  (layout writes are rank-0 only) and the others wait at a barrier wherever they read them next.

Objectives whose loss couples the images of a batch see the whole batch through `Batch.gather`
(an all-gather that passes gradients back to the rank that owns each row) and `Batch.local`:
- Exemplar: every rank gathers the 2B embeddings and computes the same triplet loss over all of
  them, so its negatives are mined in the global batch, as on one process;
- NPID: the noise rows are drawn from the shared generator; the normaliser Z is estimated from the
  whole batch (mean over ranks) and the memory bank is updated with every rank's embeddings, so the
  bank stays identical on all ranks;
- S4L: the label loss is the mean over the whole batch's labelled images, wherever they landed
  (the paired batch puts them first, so with 2 ranks rank 0 holds all of them).
"""
from __future__ import annotations

import inspect
import os

import torch
import torch.distributed as dist
from torch import nn

from .errors import UserError

def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Started by torchrun (or any launcher that sets the env:// variables) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> str:
    """Join the process group (gloo on CPU, NCCL on CUDA); return this rank's device."""
    if not launched() or dist.is_initialized():
        return device
    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    global _BN_GROUP
    _BN_GROUP = None if cuda else dist.new_group()   # every rank creates groups in the same order
    return device


_BN_GROUP = None   # the CPU batch-norm synchronisation's own process group (see the module's docstring)


def data_parallel(module: nn.Module, device: str) -> nn.Module:
    """`module` (one training step: backbone and task) under DistributedDataParallel: gradients
    averaged over ranks in buckets, overlapped with backward. Buffers are not broadcast (batch-norm
    statistics are synchronised, so they are equal on every rank); static_graph: every step uses the
    same parameters, and a parameter that no step uses (a gated backbone's gates when re-trained on
    labels) is found once, in the first step."""
    cuda = torch.device(device).type == "cuda"
    ddp = nn.parallel.DistributedDataParallel
    # torch 2.13 renamed broadcast_buffers (still accepted, with a FutureWarning); older ones lack the new name
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters \
        else {"broadcast_buffers": False}
    return ddp(module, device_ids=[torch.device(device)] if cuda else None, static_graph=True, **no_sync)


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def check_batch(batch_size: int) -> None:
    if batch_size % world():
        raise UserError(f"--batch-size {batch_size} does not divide by the {world()} processes; pass a "
                        f"multiple of {world()} (it is the global batch, split evenly)")


def rows(batch_size: int) -> slice | None:
    """This rank's contiguous share of a global batch of `batch_size` rows; None on one process."""
    n = world()
    if n == 1:
        return None
    b = batch_size // n
    return slice(rank() * b, (rank() + 1) * b)


class _Gather(torch.autograd.Function):
    """All-gather along dim 0 in rank order. Backward: this rank's slice of the gradient, times N.
    Valid because every rank computes the same loss from the gathered tensor (so the gradients
    w.r.t. it are equal on all ranks) and gradients are averaged over ranks afterwards: the N
    cancels the averaging and each row's gradient reaches its owner's parameters once."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(world())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        b = grad.shape[0] // world()
        return grad[rank() * b:(rank() + 1) * b] * world()


def gather(x: torch.Tensor) -> torch.Tensor:
    """(b, ...) on each of N ranks -> (N*b, ...) on every rank, differentiable (see _Gather)."""
    return _Gather.apply(x) if world() > 1 else x


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a tensor without gradient (equal shares: the mean of the global batch)."""
    if world() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world()


def sum_over_ranks(*values: torch.Tensor) -> list[torch.Tensor]:
    """Element-wise sums over ranks of scalar tensors (loss sums, counts) for logging."""
    if world() == 1:
        return list(values)
    flat = torch.stack([v.to(values[0].device).double() for v in values])
    dist.all_reduce(flat)
    return list(flat.unbind())


class _SyncBatchNorm(torch.autograd.Function):
    """Batch-norm over the global batch. Forward: each rank's per-channel mean and variance (native
    kernel, any memory format), combined over ranks in float64 by one all-reduce of (C,) sums, then
    normalised by the native eval-mode kernel. Backward: the native eval-mode backward gives
    dy * w * invstd and the local per-channel sums of dy and dy * xhat; those sums are all-reduced
    and the train-mode correction, an affine function of x per channel, is subtracted."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        c, dt = x.shape[1], torch.float64                       # x: (B_local, C, H, W) or (B_local, C)
        scratch = torch.zeros(c, device=x.device, dtype=weight.dtype), torch.ones(c, device=x.device, dtype=weight.dtype)
        mean, var = torch.batch_norm_update_stats(x, *scratch, 0.0)   # local, biased; scratch untouched at momentum 0
        n = torch.full((1,), x.numel() / c, device=x.device, dtype=dt)
        stats = torch.cat([mean.to(dt) * n, (var.to(dt) + mean.to(dt) ** 2) * n, n])
        dist.all_reduce(stats, group=_BN_GROUP)                 # (2C+1,): sums of x and x^2, count
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean ** 2).clamp_min(0)
        mean_w, var_w = mean.to(weight.dtype), var.to(weight.dtype)
        y = nn.functional.batch_norm(x, mean_w, var_w, weight, bias, training=False, eps=eps)
        ctx.save_for_backward(x, weight, mean_w, var_w)
        ctx.eps, ctx.n = eps, n
        mean, var = mean.float(), var.float()  # fp32 for the running statistics, even under bf16
        ctx.mark_non_differentiable(mean, var, n)
        return y, mean, var, n

    @staticmethod
    def backward(ctx, grad_out, _gmean, _gvar, _gn):
        x, weight, mean, var = ctx.saved_tensors
        unused = mean.new_empty(0)  # not None: CUDA's channels_last path asserts they are defined
        grad_in, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_out.contiguous(memory_format=_format(x)), x, weight, mean, var, unused, unused, False, ctx.eps,
            [True, True, True])                                 # dy*w*invstd; local sums of dy*xhat, dy
        sums = torch.cat([grad_bias, grad_weight]).double()    # (2C,) over every rank's images
        dist.all_reduce(sums, group=_BN_GROUP)
        c, shape = weight.shape[0], (1, -1, *[1] * (x.dim() - 2))
        invstd = torch.rsqrt(var.double() + ctx.eps)
        k = invstd * weight.double()
        # dx = (dy - mean(dy) - xhat * mean(dy * xhat)) * w * invstd = grad_in - (offset + slope * x)
        slope = k * invstd * sums[c:] / ctx.n
        offset = k * sums[:c] / ctx.n - slope * mean.double()
        # in at least fp32: offset holds -slope * mean, which cancels against slope * x (bf16 would lose it)
        wide = x if x.dtype in (torch.float32, torch.float64) else x.float()
        correction = torch.addcmul(offset.to(wide.dtype).view(shape), wide, slope.to(wide.dtype).view(shape))
        grad_x = (grad_in - correction).to(x.dtype)
        return grad_x, grad_weight, grad_bias, None


def _format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format


class _SyncForward:
    """A batch-norm layer whose training-mode statistics span every rank; the same parameters and
    buffers (checkpoints are interchangeable), and the plain layer on one process or in eval."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world() > 1):
            return super().forward(x)
        y, mean, var, n = _SyncBatchNorm.apply(x, self.weight, self.bias, self.eps)
        with torch.no_grad():  # running statistics as BatchNorm2d keeps them (unbiased variance)
            self.num_batches_tracked.add_(1)
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
            self.running_var.mul_(1 - m).add_((var * (n / (n - 1)).float()).to(self.running_var.dtype), alpha=m)
        return y


class SyncBatchNorm2d(_SyncForward, nn.BatchNorm2d):
    """nn.BatchNorm2d over the global batch (convolutions)."""


class SyncBatchNorm1d(_SyncForward, nn.BatchNorm1d):
    """nn.BatchNorm1d over the global batch (projectors: VICReg's)."""


SYNCED = {nn.BatchNorm2d: SyncBatchNorm2d, nn.BatchNorm1d: SyncBatchNorm1d}


def sync_batchnorm(module: nn.Module, device: str = "cpu") -> nn.Module:
    """Every BatchNorm2d / BatchNorm1d of `module` synchronised over ranks (same state, same keys):
    torch.nn.SyncBatchNorm on CUDA (returns the converted module), ours in place elsewhere."""
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for m in module.modules():
        if type(m) in SYNCED:
            if not (m.affine and m.track_running_stats and m.momentum is not None):
                raise ValueError(f"{m}: only affine batch-norm with running statistics is synchronised")
            m.__class__ = SYNCED[type(m)]
    return module
