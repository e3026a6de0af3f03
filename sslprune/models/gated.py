"""Gated ResNets (Krishna et al. 2023, after DGNet): one network, two paths through the same weights.

- dense path: every channel, the blocks' own batch-norm (bn1, bn2: torchvision's names, so the
  dense path is an ordinary ResNet and loads and exports as one);
- gated path: in every BasicBlock a small gate network looks at the block's input and opens some of
  the first conv's output channels (= the second conv's input channels) for this image; the path has
  its own batch-norm inside the blocks (bn1_gated, bn2_gated). Stem, second convs' outputs,
  shortcuts (with their batch-norm) and heads are never gated and are shared by both paths.

Gate network (per block): global average pool of the block input (B, Cin) -> 1x1 conv to Cin/4 ->
BN -> ReLU -> 1x1 conv to C, no bias = logits (B, C). Training: logistic noise log u - log(1 - u)
is added, sigmoid(. / tau) with tau = 2/3, a hard threshold at 0.5 forward and the sigmoid's
gradient backward (straight-through). Evaluation: open where the logit >= 0, no noise.

The gates are simulated on the whole batch (the full conv runs, then closed channels are zeroed),
as in the paper; `path="skip"` computes only the open channels of each image (real skipping: the
MACs it runs are the ones `macs` counts, which tests check with torch.utils.flop_counter).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .resnet import BasicBlock, ResNet

TAU = 2 / 3
PATHS = ("dense", "gated", "skip")


class Gate(nn.Module):
    """Block input (B, Cin, H, W) -> channel logits (B, C)."""

    def __init__(self, cin: int, channels: int):
        super().__init__()
        hidden = max(1, cin // 4)
        self.conv1 = nn.Conv2d(cin, hidden, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(x, 1)                  # (B, Cin, 1, 1)
        return self.conv2(torch.relu(self.bn(self.conv1(pooled)))).flatten(1)  # (B, C)


def open_gates(logits: torch.Tensor, uniform: torch.Tensor | None) -> torch.Tensor:
    """(B, C) logits -> (B, C) gates in {0, 1}. uniform: (B, C) draws in (0, 1) for training (the
    straight-through estimate: forward the hard gate, backward the noisy sigmoid's gradient); None:
    the deterministic gate of evaluation."""
    if uniform is None:   # float32 whatever the autocast: gates are summed into counts and MACs
        return (logits >= 0).float()
    u = uniform.clamp(1e-6, 1 - 1e-6)
    return _StraightThrough.apply(torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / TAU))


class _StraightThrough(torch.autograd.Function):
    """Exactly 0 or 1 forward (hard + soft - soft.detach() would round to 0.9999999), the identity backward."""

    @staticmethod
    def forward(ctx, soft):
        return (soft >= 0.5).to(soft.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


class GatedBasicBlock(BasicBlock):
    def __init__(self, cin: int, width: int, stride: int):
        super().__init__(cin, width, stride)
        self.bn1_gated = nn.BatchNorm2d(width)
        self.bn2_gated = nn.BatchNorm2d(width)
        self.gate = Gate(cin, width)

    def forward(self, x, path: str = "dense", uniform: torch.Tensor | None = None):
        """-> (output, gates (B, C) or None on the dense path)."""
        if path == "dense":
            return super().forward(x), None
        gates = open_gates(self.gate(x), uniform)                           # (B, C)
        shortcut = self.downsample(x) if self.downsample is not None else x
        if path == "skip":
            return self._skip(x, gates, shortcut), gates
        out = self.relu(self.bn1_gated(self.conv1(x))) * gates[:, :, None, None]
        out = self.bn2_gated(self.conv2(out))
        return self.relu(out + shortcut), gates

    def _skip(self, x, gates, shortcut):
        """The gated path computing only each image's open channels (batch-norm in eval mode: the
        running statistics of the open channels). Equal to the simulated path in eval mode."""
        out = []
        for i, g in enumerate(gates):
            keep = g.nonzero().flatten()                                    # (c,) open channels
            if len(keep):
                h = nn.functional.conv2d(x[i:i + 1], self.conv1.weight[keep], None, self.conv1.stride, 1)
                h = self.relu(_bn_eval(self.bn1_gated, h, keep))
                h = nn.functional.conv2d(h, self.conv2.weight[:, keep], None, 1, 1)
            else:  # every channel closed: conv2 sees zeros, nothing to compute
                h = shortcut.new_zeros((1, *shortcut.shape[1:]))
            out.append(_bn_eval(self.bn2_gated, h, None))
        return self.relu(torch.cat(out) + shortcut)


def _bn_eval(bn: nn.BatchNorm2d, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    pick = (lambda t: t) if keep is None else (lambda t: t[keep])
    return nn.functional.batch_norm(x, pick(bn.running_mean), pick(bn.running_var), pick(bn.weight),
                                    pick(bn.bias), False, 0.0, bn.eps)


@dataclass(frozen=True)
class BlockCost:
    """MACs of one block per image: `fixed` (the shortcut conv and the gate network) and `per_open`
    (what each open channel costs: its conv1 filter and its conv2 input slice)."""
    channels: int
    fixed_dense: int
    gate: int
    per_open: int


class GatedResNet(ResNet):
    """A ResNet of GatedBasicBlocks. forward(x) is the dense path (an ordinary ResNet to every other
    part of sslprune); forward(x, path="gated", uniform=u) the gated one, its gates kept in
    `self.gates` (a list of (B, C_l) tensors, one per block) for the budget losses."""

    def __init__(self, blocks: list[int], widths: list[int], cifar_stem: bool):
        super().__init__(GatedBasicBlock, blocks, widths, cifar_stem)
        self.gates: list[torch.Tensor] = []

    def blocks(self) -> list[GatedBasicBlock]:
        return [b for i in range(self.num_stages) for b in getattr(self, f"layer{i + 1}")]

    @property
    def gate_channels(self) -> int:
        """Gated channels in all, the width of the uniform draws of one image (B, gate_channels)."""
        return sum(b.conv1.out_channels for b in self.blocks())

    def no_weight_decay(self) -> list[nn.Parameter]:
        """The gate networks' parameters: trained without weight decay (as the paper)."""
        return [p for b in self.blocks() for p in b.gate.parameters()]

    def forward(self, x: torch.Tensor, path: str = "dense", uniform: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, feature_dim). uniform: (B, gate_channels) draws for training gates."""
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        draws = iter(uniform.split([b.conv1.out_channels for b in self.blocks()], 1)) if uniform is not None else None
        self.gates = []
        for block in self.blocks():
            x, gates = block(x, path, next(draws) if draws is not None else None)
            if gates is not None:
                self.gates.append(gates)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)

    def costs(self, image_size: int) -> tuple[int, list[BlockCost]]:
        """(stem MACs, per-block costs) for one image of image_size x image_size, by the analytic
        count of convolutions (what torch.utils.flop_counter counts, / 2: MACs, as the paper)."""
        side = image_size
        stem = _conv_macs(self.conv1, side)
        side = _out_side(self.conv1, side)
        if not isinstance(self.maxpool, nn.Identity):
            side = (side + 2 * 1 - 3) // 2 + 1
        out = []
        for b in self.blocks():
            mid = _out_side(b.conv1, side)
            cin, width = b.conv1.in_channels, b.conv1.out_channels
            shortcut = _conv_macs(b.downsample[0], side) if b.downsample is not None else 0
            gate = b.gate.conv1.in_channels * b.gate.conv1.out_channels + b.gate.conv2.in_channels * width
            per_open = mid * mid * 9 * cin + mid * mid * 9 * width
            out.append(BlockCost(width, shortcut, gate, per_open))
            side = mid
        return stem, out

    def macs(self, gates: list[torch.Tensor], image_size: int) -> torch.Tensor:
        """Per-image MACs of the gated path (B,) from its gates (B, C_l) per block: stem, shortcuts,
        gate networks and the open channels' convs. Differentiable in the gates."""
        stem, costs = self.costs(image_size)
        total = torch.full((len(gates[0]),), float(stem + sum(c.fixed_dense + c.gate for c in costs)),
                           device=gates[0].device)
        for g, c in zip(gates, costs):
            total = total + g.float().sum(1) * c.per_open
        return total

    def dense_macs(self, image_size: int) -> int:
        """MACs of the dense path for one image (no gate network)."""
        stem, costs = self.costs(image_size)
        return stem + sum(c.fixed_dense + c.channels * c.per_open for c in costs)


def _out_side(conv: nn.Conv2d, side: int) -> int:
    return (side + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1


def _conv_macs(conv: nn.Conv2d, side: int) -> int:
    out = _out_side(conv, side)
    return out * out * conv.out_channels * conv.in_channels * math.prod(conv.kernel_size) // conv.groups


def resnet20_gated() -> GatedResNet:
    return GatedResNet([3, 3, 3], [16, 32, 64], cifar_stem=True)


def resnet18_cifar_gated() -> GatedResNet:
    return GatedResNet([2, 2, 2, 2], [64, 128, 256, 512], cifar_stem=True)


@torch.no_grad()
def opened_channels(model: GatedResNet, images: torch.Tensor, normalize, batch_size: int = 256) -> list[torch.Tensor]:
    """Per block, (C_l,) bool: the channels the gated path (evaluation gates) opens for at least one
    of `images` (N, 3, H, W; uint8 or 0-1 floats)."""
    model.eval()
    opened = None
    for i in range(0, len(images), batch_size):
        model(normalize(images[i:i + batch_size]), path="gated")
        counts = [g.sum(0) > 0 for g in model.gates]
        opened = counts if opened is None else [a | b for a, b in zip(opened, counts)]
    return opened


def compact_gated(model: GatedResNet, keep: list[torch.Tensor]) -> GatedResNet:
    """A copy of `model` without the gated channels `keep` (per block, (C_l,) bool) leaves out:
    conv1's filters, both paths' bn1, the gate's logits and conv2's input slices. Its gated path
    computes what the original's does on every image that opens no channel outside `keep` (every
    image of the split `keep` was measured on, by construction); its dense path is no longer the
    dense network (channels are missing), so only path="gated" or "skip" is meaningful."""
    import copy

    model.gates = []   # the last forward's gates may belong to an autograd graph, which does not copy
    model = copy.deepcopy(model).eval()
    for block, k in zip(model.blocks(), keep):
        # a block that never opens keeps one (closed) channel: conv2 then sees zeros, as in the original
        k = k.nonzero().flatten() if k.any() else torch.zeros(1, dtype=torch.long)
        block.conv1 = _conv_slice(block.conv1, out=k)
        block.conv2 = _conv_slice(block.conv2, into=k)
        block.gate.conv2 = _conv_slice(block.gate.conv2, out=k)
        block.bn1, block.bn1_gated = _bn_slice(block.bn1, k), _bn_slice(block.bn1_gated, k)
    return model


def _conv_slice(conv: nn.Conv2d, out: torch.Tensor | None = None, into: torch.Tensor | None = None) -> nn.Conv2d:
    w = conv.weight.detach()
    w = w[out] if out is not None else w
    w = w[:, into] if into is not None else w
    new = nn.Conv2d(w.shape[1], w.shape[0], conv.kernel_size, conv.stride, conv.padding, bias=False)
    new.weight = nn.Parameter(w.clone())
    return new


def _bn_slice(bn: nn.BatchNorm2d, keep: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(keep), bn.eps, bn.momentum)
    new.load_state_dict({"weight": bn.weight[keep], "bias": bn.bias[keep], "running_mean": bn.running_mean[keep],
                         "running_var": bn.running_var[keep], "num_batches_tracked": bn.num_batches_tracked})
    return new.eval()


@torch.no_grad()
def gate_statistics(backbone, images: torch.Tensor, normalize, batch_size: int) -> dict[str, float]:
    """The gated path on the images themselves (N, 3, H, W; no views), evaluation gates: realised
    MACs `macs` (mean over images, a fraction of the dense network's) and per block l its open
    fraction `open_l` and the fractions of its channels open for every image `always_open_l` and for
    none `never_open_l` (the paper's "conditional" channels are the rest)."""
    side, dense = images.shape[-1], backbone.dense_macs(images.shape[-1])
    macs, counts = 0.0, None
    for i in range(0, len(images), batch_size):
        backbone(normalize(images[i:i + batch_size]), path="gated")
        macs += float(backbone.macs(backbone.gates, side).sum()) / dense
        c = [g.sum(0, dtype=torch.float64) for g in backbone.gates]      # exact counts, (C_l,) each
        counts = c if counts is None else [a + b for a, b in zip(counts, c)]
    n = len(images)
    out = {"macs": macs / n}
    for l, c in enumerate(counts):
        out |= {f"open_{l + 1}": float(c.mean()) / n, f"always_open_{l + 1}": float((c == n).double().mean()),
                f"never_open_{l + 1}": float((c == 0).double().mean())}
    return out


def dense_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A gated ResNet's state dict -> its dense path's: an ordinary ResNet's (torchvision) keys."""
    return {k: v for k, v in state.items() if ".gate." not in k and "_gated." not in k}
