"""A task = a head + views + a loss, visible together (lightly / VISSL style).

The backbone maps images to features and is the only thing pruned or transferred. The task owns
everything objective-specific (heads, views, loss, and state such as NPID's memory bank, kept as
buffers so checkpoints carry it), so a mask found with any task can be re-trained with any other.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import distributed
from ..errors import UserError
from .sampling import UNIFORM, UNLABELLED  # noqa: F401 (UNLABELLED: tasks.UNLABELLED)


@dataclass
class Batch:
    images: torch.Tensor            # (B, C, H, W) uint8, after the dataset's own crop/flip
    labels: torch.Tensor            # (B,) int64; UNLABELLED where the label is hidden
    index: torch.Tensor             # (B,) rows of these images in the training split (NPID's bank)
    generator: torch.Generator      # randomness of the task's own views (resumable)
    rows: slice | None = None       # the rows of the (global) batch this step trains on: N processes'
                                    # share, or a micro-batch of it (--accumulate); None: all of them
    progress: float = 0.0           # epochs done / epochs at this step's epoch (schedules inside a loss: VICReg's gate band)

    @property
    def sharded(self) -> bool:
        return self.rows is not None

    def local(self) -> "Batch":
        """This process's rows (the whole batch on one process)."""
        if self.rows is None:
            return self
        return Batch(self.images[self.rows], self.labels[self.rows], self.index[self.rows], self.generator,
                     progress=self.progress)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Values computed from local() rows, (b, ...) -> those of the whole batch in batch order,
        (B, ...), gradients flowing back to the process that computed each row. Every process must
        then compute the same loss from them (sslprune.distributed._Gather)."""
        return distributed.gather(values) if self.sharded else values


class Task(nn.Module):
    """Subclasses are built as Task(cfg, feature_dim, num_classes, num_train), define `head`, and
    either `views` (for a cross-entropy head) or their own `step`."""

    name = "base"
    metric = "accuracy"      # what `acc` measures for this objective (reports say it)
    sampler = UNIFORM        # UNIFORM: random batches | PAIRED: half labelled, half unlabelled (tasks/sampling.py)
    batch_metric = False     # True: the metric depends on the batch, evaluate at the training batch size
    options: tuple[str, ...] = ()   # the config.Task fields it reads; the others must keep their defaults
    unlabelled = ""          # with --label-fraction: "drop" unlabelled images (labels) | "keep" them as UNLABELLED (s4l)
    square = False           # True: its views need square images (rotations)
    stackable = False        # True: step() draws nothing from batch.generator, reads no batch.index and keeps
                             # no state, so K copies can train as one network (sslprune/stacked.py)
    accumulable = False      # True: step()'s loss is the mean of per-image losses over batch.local() (no
                             # gather, no state), so equal micro-batches' mean gradients sum to the batch's
    demo_options: dict = {}  # what the demo's 1,437 digits need (sslprune/demo.py)

    def identity(self) -> str:
        """What a resumed training must match of this task (train.py's fingerprint): its name, and
        options that change the computation without changing the state's shapes."""
        return self.name

    @classmethod
    def check_config(cls, cfg) -> None:
        """Refuse, before any data is read, settings of config.Task `cfg` this objective cannot use."""

    @classmethod
    def check_data(cls, cfg, train, data) -> None:
        """Refuse, before anything is written, data (a Dataset) or training settings (config.Train)
        this objective cannot train on. One line each, naming the fix."""
        if train.accumulate > 1 and not cls.accumulable:
            raise UserError(f"--task {cls.name} computes its loss across the batch or keeps state, so micro-batches "
                            f"would change what it computes; drop --accumulate (or use more GPUs)")
        h, w = data.train.image_shape[-2:]
        if cls.square and h != w:
            raise UserError(f"--task {cls.name} needs square images, these are {h}x{w}; pass --image-size N")

    @torch.no_grad()
    def rebuild_state(self, backbone: nn.Module, images: torch.Tensor, normalize) -> None:
        """Recompute state that stands for the network's own outputs (NPID's bank) from `images`
        (the training split, uint8), for a network that was not trained into it (an interpolated one)."""

    def views(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The network inputs (B', C, H, W; uint8 or 0-1 floats) and the loss targets (B',)."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, targets)

    def step(self, backbone: nn.Module, batch: Batch, normalize) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One forward pass. Returns (mean loss, number correct, number of predictions).
        Per-image losses need only this process's rows: their mean over ranks is the batch's mean."""
        inputs, targets = self.views(batch.local())
        logits = self.head(backbone(normalize(inputs)))
        loss = self.loss(logits, targets)
        correct = (logits.argmax(1) == targets).sum()
        return loss, correct, targets.numel()

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module, images: torch.Tensor, labels: torch.Tensor, normalize,
                 batch_size: int, train_labels: torch.Tensor | None = None) -> dict[str, float]:
        """Loss and accuracy on a held-out split (B, C, H, W uint8), batch-norm in eval mode, no
        dataset augmentation; random views come from a fixed seed, so every epoch sees the same test.
        `train_labels` serve monitors that need them (NPID's kNN); training never sees them."""
        backbone.eval(), self.eval()
        generator = torch.Generator(device=images.device).manual_seed(0)
        loss_sum, correct, count = 0.0, 0, 0
        for i in range(0, len(images), batch_size):
            idx = torch.arange(i, min(i + batch_size, len(images)), device=images.device)
            loss, c, n = self.step(backbone, Batch(images[idx], labels[idx], idx, generator), normalize)
            loss_sum += float(loss) * n
            correct += int(c)
            count += n
        return {"loss": loss_sum / count, "acc": correct / count}
