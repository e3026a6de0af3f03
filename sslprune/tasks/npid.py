"""NPID (Wu et al. 2018): non-parametric instance discrimination. Every training image is its own
class, represented by a row of a memory bank instead of a weight vector.

- embedding: linear head to 128 dims, L2-normalised: v (B, D);
- bank: (N, D) unit rows, one per training image, sized from the dataset (a bank of the wrong size
  fails to load); row i holds a running average of image i's embeddings, updated after each step
  as normalise(m * row + (1 - m) * v) with m = 0.5;
- loss: the softmax p(i | v) = exp(v.bank_i / T) / Z over all N images, T = 0.07, approximated by
  NCE against K noise rows drawn uniformly (P_n = 1/N). Z is estimated from each batch's noise
  rows as N * mean(exp(v.bank_j / T)) and tracked by a moving average (z_momentum 0.9).
  Wu et al. estimate Z once, from the first batch, and then fix it (z_momentum 1.0 here). On CIFAR-10
  (5,000 images, convnet, SGD 0.03) that diverged: the first batch sees a random bank, so Z is too small
  by orders of magnitude once the bank holds the (initially similar) embeddings of a random network,
  and the loss grew from 264 to 1,394 in 7 epochs while kNN accuracy fell to chance (0.10). With the tracked
  Z, the loss fell from 17 to 7.2 in 5 epochs and kNN accuracy rose from 0.20 to 0.25;
- monitor: weighted kNN on the test set against the bank (k = 200, weights exp(sim / T)), the
  standard NPID accuracy. It reads the training labels; training never does.

The bank and Z are buffers: saved in checkpoints and rewind points, restored on resume.
The K noise rows are drawn once per batch and shared by its images, where Wu et al. draw K per
image: each image still scores K uniform noise rows, and scoring is one matmul instead of a
(B, K+1, D) gather. Measured on the CIFAR-10 run above with Adam: 2.0 s per epoch instead of 8.0 s,
with kNN accuracy 0.265 after 8 epochs (per-image draws: 0.271).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import distributed
from ..errors import UserError
from .base import Batch, Task


class NPID(Task):
    name = "npid"
    metric = "weighted kNN accuracy (test vs. bank)"
    options = ("embedding_dim", "nce_negatives", "temperature", "bank_momentum", "z_momentum", "knn")
    demo_options = {"nce_negatives": 1024}   # fewer than the bank's rows

    @classmethod
    def check_data(cls, cfg, train, data) -> None:
        super().check_data(cfg, train, data)
        n = len(data.train)
        if cfg.knn > n:
            raise UserError(f"--knn {cfg.knn} exceeds the {n} rows of the memory bank; pass a smaller --knn")
        if cfg.nce_negatives >= n:
            raise UserError(f"--nce-negatives {cfg.nce_negatives} is not below the {n} training images (the "
                            f"bank's rows); pass a smaller --nce-negatives")

    def __init__(self, cfg, feature_dim: int, num_classes: int, num_train: int):
        super().__init__()
        self.head = nn.Linear(feature_dim, cfg.embedding_dim)
        self.k, self.t, self.m, self.knn = cfg.nce_negatives, cfg.temperature, cfg.bank_momentum, cfg.knn
        self.z_momentum = cfg.z_momentum
        self.num_classes = num_classes
        # Random unit rows (under the build seed): every row is a valid point from the start.
        self.register_buffer("bank", nn.functional.normalize(torch.randn(num_train, cfg.embedding_dim), dim=1))
        self.register_buffer("z", torch.tensor(-1.0))  # NCE normaliser; < 0 until the first batch

    @torch.no_grad()
    def rebuild_state(self, backbone, images, normalize) -> None:
        """The bank as the network embeds every training image now (eval mode)."""
        was = backbone.training, self.training
        backbone.eval(), self.eval()
        self.bank.copy_(torch.cat([self.embed(backbone, images[i:i + 256], normalize) for i in range(0, len(images), 256)]))
        backbone.train(was[0]), self.train(was[1])

    def embed(self, backbone, images, normalize) -> torch.Tensor:
        return nn.functional.normalize(self.head(backbone(normalize(images))), dim=1)  # (B, D)

    def step(self, backbone, batch: Batch, normalize):
        local = batch.local()                                                         # N processes: this one's rows
        v = self.embed(backbone, local.images, normalize)                             # (b, D)
        n, b = len(self.bank), len(v)
        # K noise rows drawn uniformly, shared by the batch: each image still gets K independent
        # uniform noise samples, and scoring them is one (B, D) x (D, K) matmul instead of a
        # (B, K+1, D) gather (Wu et al. draw per image: 268 MB per batch of 128 at K = 4096).
        noise = torch.randint(0, n, (self.k,), generator=batch.generator,
                              device=batch.generator.device).to(v.device)              # (K,)
        with torch.no_grad():
            positive, negative = self.bank[local.index], self.bank[noise]              # (b, D), (K, D)
        p = torch.exp(torch.cat([(v * positive).sum(1, keepdim=True), v @ negative.T], 1) / self.t)  # (b, K+1)
        if self.training:  # no host sync: the first estimate replaces the -1 placeholder
            estimate = p[:, 1:].detach().mean() * n
            if batch.sharded:
                estimate = distributed.mean_over_ranks(estimate)                      # the whole batch's
            self.z.copy_(torch.where(self.z < 0, estimate,
                                     self.z_momentum * self.z + (1 - self.z_momentum) * estimate))
        p = p / self.z
        noise_mass = self.k / n                                                          # K * P_n
        eps = 1e-7
        log_data = torch.log(p[:, 0] / (p[:, 0] + noise_mass + eps))                    # positive is data
        log_noise = torch.log(noise_mass / (p[:, 1:] + noise_mass + eps))               # negatives are noise
        loss = -(log_data.sum() + log_noise.sum()) / b   # per image: the mean over ranks is the batch's
        correct = (p[:, 0] > p[:, 1:].amax(1)).sum()  # the positive scores above all K noise rows
        if self.training:  # every process writes every row of the batch: the banks stay identical
            with torch.no_grad():
                rows_new = self.m * self.bank[batch.index] + (1 - self.m) * batch.gather(v.detach())
                self.bank[batch.index] = nn.functional.normalize(rows_new, dim=1)
        return loss, correct, b

    @torch.no_grad()
    def evaluate(self, backbone, images, labels, normalize, batch_size, train_labels=None):
        """Weighted kNN (Wu et al.): each test image votes with its k nearest bank rows, weight
        exp(similarity / T), for their training labels."""
        if train_labels is None:
            raise ValueError("the NPID monitor needs the training labels")
        backbone.eval(), self.eval()
        k = min(self.knn, len(self.bank))
        correct = 0
        for i in range(0, len(images), batch_size):
            v = self.embed(backbone, images[i:i + batch_size], normalize)                 # (b, D)
            sim, nearest = (v @ self.bank.T).topk(k, dim=1)                               # (b, k)
            votes = torch.zeros(len(v), self.num_classes, device=v.device)
            votes.scatter_add_(1, train_labels[nearest], torch.exp(sim / self.t))
            correct += int((votes.argmax(1) == labels[i:i + batch_size]).sum())
        return {"loss": None, "acc": correct / len(images)}
