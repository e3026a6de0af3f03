"""LARS (You et al. 2017) as solo-learn runs it for VICReg (Krishna et al. 2023's code is built on it):
SGD with momentum whose step for each weight tensor is scaled by a trust ratio
    eta * ||w|| / (||g|| + weight_decay * ||w|| + eps),   clipped to at most 1 (lr-relative: min(ratio / lr, 1)),
with weight decay added to the gradient before scaling. Biases and batch-norm parameters (1-d
tensors) are excluded from both: plain SGD with momentum, no weight decay (exclude_bias_n_norm).
"""
from __future__ import annotations

import torch

ETA = 0.02    # solo-learn's default for VICReg, and Krishna et al.'s scripts
EPS = 1e-8


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = ETA, eps: float = EPS):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim != 1:   # conv and linear weights: the layer-wise trust ratio
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    ratio = group["eta"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                    both = (w_norm > 0) & (g_norm > 0)   # else solo-learn leaves the gradient as it is
                    d = torch.where(both, (d + wd * p) * torch.clamp(ratio / lr, max=1.0), d)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                p.add_(state["momentum_buffer"], alpha=-lr)
