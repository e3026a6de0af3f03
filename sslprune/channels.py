"""Structured pruning: whole channels, kept as an ordinary weight mask.

A *channel group* is a set of channels that must go together (VainF's Torch-Pruning finds them from
the traced graph): a conv's output channels, the batch-norm after it, and the input slices of every
layer that reads them; in a ResNet, all the convs whose outputs meet in one residual addition. We
ask Torch-Pruning for the groups once and keep them as plain data (`Group`): which weight, which
dimension. Everything else is ours:

- the channel state is derived from the weight mask (a channel is alive while its root conv still
  has a weight in it), so a channel mask is a weight mask with whole filters and the matching input
  slices at zero: rewind, reinit, re-training, probes and the report treat it like any other mask;
- a level removes round(fraction x surviving channels) channels, ranked globally by a score
  (`CHANNEL_SCORES`), never the best surviving channel of a group (every layer stays alive);
- the group whose channels are the backbone's output (what a task's head reads) is never pruned,
  nor a group whose channels feed a reshape (e.g. AlexNet's last conv into its flatten).

`compact` removes the dead channels physically (Torch-Pruning's own pruning functions), giving a
smaller dense network that computes what the masked one does (tested for every model family).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError
from .pruning import Mask, dense_mask


@dataclass(frozen=True)
class Group:
    """Coupled channels: pruning channel c removes slice c along `dim` of each member.

    members: (module name, dim) of every Conv2d / Linear weight, dim 0 = output channels (filters),
    1 = input channels; members[0] is the root, whose output channels the group is.
    norms: names of the batch-norm layers normalising these channels."""
    members: tuple[tuple[str, int], ...]
    norms: tuple[str, ...]
    size: int


def _example(backbone: nn.Module) -> torch.Tensor:
    """An input to trace the graph with: 64x64, or the size a model declares (AlexNet: 224)."""
    size = getattr(backbone, "example_size", 64)
    return torch.zeros(1, 3, size, size)


def channel_groups(backbone: nn.Module) -> list[Group]:
    """The prunable channel groups of a backbone, in module order of their roots."""
    import torch_pruning as tp

    head = nn.Linear(backbone.feature_dim, 2)  # stands for any task's head: its input is never pruned
    net = nn.Sequential(backbone, head)
    names = {m: n.removeprefix("0.") for n, m in net.named_modules()}
    was_training = backbone.training
    net.eval()
    try:
        graph = tp.DependencyGraph().build_dependency(net, example_inputs=_example(backbone))
        raw = list(graph.get_all_groups(ignored_layers=[head], root_module_types=[nn.Conv2d, nn.Linear]))
    finally:
        backbone.train(was_training)
    groups = []
    for group in raw:
        size = len(group[0].idxs)
        members, norms, ok = [], [], True
        for dep, idxs in group:
            module = dep.target.module
            if module is head or len(idxs) != size or list(idxs) != list(range(size)):
                ok = False  # the features the head reads, or channels feeding a reshape
                break
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                out = dep.handler.__name__ == "prune_out_channels"
                if getattr(module, "groups", 1) != 1:
                    ok = False  # depthwise convs: not in our model families
                    break
                members.append((names[module], 0 if out else 1))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                norms.append(names[module])
        if ok and members:
            groups.append(Group(members=tuple(dict.fromkeys(members)), norms=tuple(dict.fromkeys(norms)), size=size))
    order = {n: i for i, n in enumerate(names.values())}
    return sorted(groups, key=lambda g: order[g.members[0][0]])


def _slices(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """(C, rest) view of a weight with channels along `dim` first."""
    return weight.transpose(0, dim).reshape(weight.shape[dim], -1)


def alive_channels(groups: list[Group], mask: Mask) -> list[torch.Tensor]:
    """Per group, a (size,) bool tensor: the channels whose root filter still has a weight."""
    return [_slices(mask[f"{g.members[0][0]}.weight"], g.members[0][1]).any(1) for g in groups]


def channel_mask(backbone: nn.Module, groups: list[Group], alive: list[torch.Tensor]) -> Mask:
    """The weight mask of a channel state: dense, with each dead channel's slices at zero."""
    mask = dense_mask(backbone)
    for g, keep in zip(groups, alive):
        for name, dim in g.members:
            m = mask[f"{name}.weight"]
            shape = [1] * m.ndim
            shape[dim] = -1
            m &= keep.view(shape)
    return mask


def _l1(w: torch.Tensor) -> torch.Tensor:
    return w.abs().mean(1)


def _l2(w: torch.Tensor) -> torch.Tensor:
    return w.pow(2).mean(1).sqrt()


def channel_scores(groups: list[Group], state: dict[str, torch.Tensor], score: str,
                   generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Per group, a (size,) float score per channel from a backbone state dict (trained weights).

    l1 / l2: the mean |w| / root-mean-square of the channel's slices, averaged over the group's
    members (a per-weight average, so layers of different fan-in compare on one global scale);
    bn: the mean |gamma| of the group's batch-norm layers (Liu et al. 2017, network slimming);
    random: uniform (the random-pruning baseline).
    Each group's scores are divided by their mean over its live channels (Torch-Pruning's "mean"
    normaliser), so the global ranking compares a channel with its own layer: without it, layers
    of small fan-in (large weights) keep every channel while wide layers are emptied first."""
    out = []
    for g in groups:
        if score == "random":
            out.append(torch.rand(g.size, generator=generator))
            continue
        if score == "bn":
            if not g.norms:
                raise UserError(f"--channel-score bn needs batch-norm after every pruned conv; "
                                f"{g.members[0][0]} has none: use --channel-score l1")
            s = torch.stack([state[f"{n}.weight"].detach().abs().float() for n in g.norms]).mean(0)
        else:
            reduce = {"l1": _l1, "l2": _l2}[score]
            s = torch.stack([reduce(_slices(state[f"{n}.weight"].detach().float(), d)) for n, d in g.members]).mean(0)
        out.append(s / s[s > 0].mean().clamp_min(1e-12) if bool((s > 0).any()) else s)
    return out


CHANNEL_SCORES = ("l1", "l2", "bn")


def prune_channels(groups: list[Group], alive: list[torch.Tensor], scores: list[torch.Tensor],
                   fraction: float, round_to: int = 1) -> list[torch.Tensor]:
    """Remove about fraction x surviving channels with the lowest scores, globally, never a group's
    best `round_to`. round_to=1: exactly round(fraction x survivors), ties broken by position.
    round_to=8: each group goes in blocks of 8 (its lowest-scored survivors first), so every layer
    keeps a multiple of 8 channels (or all of a smaller one), widths that CPU and GPU kernels
    vectorise well (Torch-Pruning's round_to); the level then removes the number of whole blocks
    nearest to round(fraction x survivors)."""
    total = sum(int(a.sum()) for a in alive)
    if not all(bool(torch.isfinite(s[a]).all()) for a, s in zip(alive, scores)):
        raise UserError("non-finite channel scores: the weights they come from diverged; nothing is pruned")
    k = int(round(fraction * total))
    blocks = []  # (score of its best channel, group, block index, channels): every block but each group's last
    for gi, (a, s) in enumerate(zip(alive, scores)):
        idx = a.nonzero().flatten()
        order = idx[torch.sort(s[idx], stable=True).indices]           # survivors, lowest score first
        first = len(order) % round_to or round_to                       # so that what stays is a multiple
        cuts = [0, *range(first, len(order) - round_to + 1, round_to)]  # block starts; the last block stays
        for b, (lo, hi) in enumerate(zip(cuts, cuts[1:])):
            blocks.append((float(s[order[hi - 1]]), gi, b, order[lo:hi]))
    if k > sum(len(c) for *_, c in blocks):
        raise UserError(f"pruning {fraction:.0%} of the {total} surviving channels would remove a whole "
                        f"layer ({sum(len(c) for *_, c in blocks)} can go before one is empty); use a smaller "
                        f"--fraction or fewer --levels")
    out, removed, skipped = [a.clone() for a in alive], 0, set()
    for _, gi, _, chans in sorted(blocks, key=lambda b: b[:3]):
        if removed >= k:
            break
        if gi in skipped or removed + len(chans) - k >= k - removed:   # overshoots more than it helps
            skipped.add(gi)                                             # a group's blocks go in order
            continue
        out[gi][chans] = False
        removed += len(chans)
    if k > 0 and removed == 0:  # every block overshoots: the level would repeat the last one's mask
        raise UserError(f"pruning {fraction:.0%} of the {total} surviving channels removes no whole block of "
                        f"{round_to}: the level would equal the one before; use a larger --fraction, a smaller "
                        f"--channel-round or fewer --levels")
    return out


def compact(backbone: nn.Module, groups: list[Group], alive: list[torch.Tensor], head: nn.Module | None = None) -> tuple[nn.Module, nn.Module | None]:
    """Copies of backbone (and head) with every dead channel removed: smaller convs, batch-norm
    layers and next-layer inputs. The copies compute what the masked network computes."""
    import torch_pruning as tp

    backbone = copy.deepcopy(backbone).cpu().float().eval()
    extra = copy.deepcopy(head).cpu().float() if head is not None else nn.Linear(backbone.feature_dim, 2)
    net = nn.Sequential(backbone, extra)
    graph = tp.DependencyGraph().build_dependency(net, example_inputs=_example(backbone))
    modules = dict(backbone.named_modules())
    for g, keep in zip(groups, alive):
        dead = (~keep).nonzero().flatten().tolist()
        if dead:
            root = modules[g.members[0][0]]
            handler = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels
            graph.get_pruning_group(root, handler, idxs=dead).prune()
    return backbone, (extra if head is not None else None)


def check_mask_is_channels(groups: list[Group], mask: Mask, backbone: nn.Module) -> list[torch.Tensor]:
    """The channel state of a mask, checked: a weight mask that is not whole channels is refused."""
    alive = alive_channels(groups, mask)
    expected = channel_mask(backbone, groups, alive)
    if any(not torch.equal(expected[n], mask[n]) for n in mask):
        raise UserError("this mask prunes single weights, not whole channels: a compact network needs "
                        "a run with --granularity channel")
    return alive



def next_mask(backbone: nn.Module, mask: Mask, state: dict[str, torch.Tensor] | None, fraction: float,
              score: str, generator: torch.Generator | None = None, round_to: int = 1) -> Mask:
    """A channel level: `mask` (whole channels) with `fraction` of its surviving channels removed,
    scored on `state` (the backbone's trained weights; None for random)."""
    groups = channel_groups(backbone)
    alive = check_mask_is_channels(groups, mask, backbone)
    kept = prune_channels(groups, alive, channel_scores(groups, state, score, generator), fraction, round_to)
    return channel_mask(backbone, groups, kept)


def check_levels(backbone: nn.Module, fraction: float, levels: int, round_to: int = 1) -> None:
    """Refuse, before anything runs, a schedule whose levels would empty a layer: level after level,
    round(fraction x survivors) channels go (with round_to > 1, about that many), and every group
    keeps one block of round_to (or all of a smaller group)."""
    groups = channel_groups(backbone)
    alive = sum(g.size for g in groups)
    floor = sum(min(g.size, round_to) for g in groups)
    state = [torch.ones(g.size, dtype=torch.bool) for g in groups]
    flat = [torch.ones(g.size) for g in groups]   # equal scores: the counts, not which channels
    for level in range(1, levels + 1):
        k = int(round(fraction * alive))
        if k > alive - floor:
            raise UserError(f"--granularity channel: level {level} would remove {k} of the {alive} surviving "
                            f"channels, emptying a layer ({floor} must stay, one block per layer); pass "
                            f"--levels {level - 1} or a smaller --fraction")
        if round_to > 1:  # whole blocks: what a level removes depends on the layers' widths, so run it
            try:
                state = prune_channels(groups, state, flat, fraction, round_to)
            except UserError as e:
                raise UserError(f"--granularity channel: level {level}: {e}") from None
            alive = sum(int(a.sum()) for a in state)
        else:
            alive -= k
