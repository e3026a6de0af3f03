"""Backbone weights from public self-supervised checkpoints, found by key layout.

Our ResNets and AlexNet use torchvision's parameter names, so a checkpoint fits once its wrapper
dict and key prefix are peeled off. Who writes what (ResNet-50 examples):

- torchvision / timm / DINO's and SimCLR-converter releases: `conv1.weight`, ..., classifier `fc.*`
- sslprune (a level's model.safetensors): `backbone.*`, task head `task.*`
- MoCo v1/v2 (facebookresearch/moco): {"state_dict": {`module.encoder_q.*` (fc = MLP projector),
  `module.encoder_k.*` (momentum encoder), `module.queue`, `module.queue_ptr`}, "epoch", "arch", "optimizer"}
- MoCo v3 (facebookresearch/moco-v3): {"state_dict": {`module.base_encoder.*` (fc = projector),
  `module.momentum_encoder.*`, `module.predictor.*`}, ...}
- DINO (facebookresearch/dino) full checkpoints: {"teacher"/"student": {`backbone.*` or
  `module.backbone.*`, `head.*`/`module.head.*`}, "optimizer", "epoch", "args" (a Namespace)}
- SwAV (facebookresearch/swav): `module.*`, `module.projection_head.*`, `module.prototypes.*`
- SimCLR re-implementations: `module.*` or `encoder.*` plus `projection_head.*`/`projector.*`
- solo-learn (Lightning): {"state_dict": {`backbone.*`, `projector.*`, `predictor.*`,
  `momentum_backbone.*`, `momentum_projector.*`, `classifier.*`}, "epoch", "global_step", ...}
- lightly: `backbone.*` (torchvision ResNet, fc = Identity) or `backbone.0.*`, `backbone.4.0.*`
  (nn.Sequential of the ResNet's children), `projection_head.*`, `prediction_head.*`, `backbone_momentum.*`;
  its DINO example: `teacher_backbone.*` and `student_backbone.*` (either form), `*_head.*`
- VISSL (facebookresearch/vissl): {"classy_state_dict": {"base_model": {"model": {"trunk":
  {`_feature_blocks.conv1.weight`, `_feature_blocks.layer1.0.conv1.weight`, ...}, "heads": {...}}}}}

Detection: every dict nested (up to 4 levels) in the file is a candidate state dict; in it, a prefix
P fits when the keys under P, with P stripped, are exactly the backbone's state-dict keys (its
`num_batches_tracked` buffers may be absent, as in pre-2018 files). Under P, the torchvision
classifier (`fc.*`, `classifier.6.*`) and sub-modules the backbone does not have (projectors,
prototypes) are dropped, as is everything outside P (heads, momentum encoders, queues); the report
lists what was dropped. Candidates are tried in WRAPPERS order, the registry's prefixes first, then
any prefix before the backbone's first key (e.g. `model.encoder.conv1.weight` -> `model.encoder.`).
Files are read with torch.load(weights_only=True) or safetensors: nothing else is unpickled.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError


@dataclass(frozen=True)
class Layout:
    keep: tuple[str, ...]                   # prefixes in front of the backbone's keys
    drop: tuple[str, ...] = ()              # heads / projectors / momentum encoders this project writes
    wrappers: tuple[str, ...] = ()          # dict keys this project stores its state dict under
    rename: dict[str, str] = field(default_factory=dict)  # first key component after the prefix


_SEQUENTIAL_RESNET = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
_LIGHTLY_DROP = ("projection_head.", "prediction_head.", "backbone_momentum.", "projection_head_momentum.",
                 "online_classifier.")

LAYOUTS: dict[str, Layout] = {
    "torchvision": Layout(keep=("",)),
    "sslprune": Layout(keep=("backbone.",), drop=("task.",)),
    "moco-v2": Layout(keep=("module.encoder_q.", "encoder_q."), wrappers=("state_dict",),
                      drop=("module.encoder_k.", "module.queue", "encoder_k.", "queue")),
    "moco-v3": Layout(keep=("module.base_encoder.", "base_encoder."), wrappers=("state_dict",),
                      drop=("module.momentum_encoder.", "module.predictor.", "momentum_encoder.", "predictor.")),
    "dino": Layout(keep=("backbone.", "module.backbone."), drop=("head.", "module.head."),
                   wrappers=("teacher", "student")),
    "simclr": Layout(keep=("module.", "encoder.", "module.encoder."),
                     drop=("module.projection_head.", "projection_head.", "module.projector.", "projector.")),
    "swav": Layout(keep=("module.",), drop=("module.projection_head.", "module.prototypes.")),
    "solo-learn": Layout(keep=("backbone.",), wrappers=("state_dict",),
                         drop=("projector.", "predictor.", "momentum_backbone.", "momentum_projector.",
                               "classifier.", "prototypes.", "momentum_head.")),
    "lightly": Layout(keep=("backbone.",), drop=_LIGHTLY_DROP, wrappers=("state_dict",)),
    "lightly-sequential": Layout(keep=("backbone.",), drop=_LIGHTLY_DROP, wrappers=("state_dict",),
                                 rename=_SEQUENTIAL_RESNET),
    # lightly's DINO: teacher and student backbones (the teacher is the released one: tried first)
    "lightly-dino": Layout(keep=("teacher_backbone.", "student_backbone."), wrappers=("state_dict",),
                           drop=("teacher_head.", "student_head.")),
    "lightly-dino-sequential": Layout(keep=("teacher_backbone.", "student_backbone."), wrappers=("state_dict",),
                                      drop=("teacher_head.", "student_head."), rename=_SEQUENTIAL_RESNET),
    "vissl": Layout(keep=("_feature_blocks.", "trunk._feature_blocks."), drop=("heads.",),
                    wrappers=("classy_state_dict", "base_model", "model", "trunk")),
}
# Dict keys a state dict is stored under, most preferred first (DINO's teacher is its released model).
WRAPPERS = ("state_dict", "model", "teacher", "student", "classy_state_dict", "base_model", "trunk",
            "model_state_dict", "network", "net")
MAX_DEPTH = 4  # classy_state_dict.base_model.model.trunk


@dataclass
class Match:
    layout: str
    prefix: str
    wrapper: str
    body: dict[str, torch.Tensor]      # backbone keys -> tensors
    head: dict[str, torch.Tensor]      # the torchvision classifier under the prefix (fc.weight, ...)
    dropped: list[str]                 # full keys of the state dict not loaded
    classifier: str | None = None      # the backbone's torchvision_head ("fc", "classifier.6")


def read(path: Path) -> object:
    """A checkpoint's contents without unpickling anything but tensors and plain containers."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"cannot read {path} as safetensors ({e}); pass an intact .safetensors or "
                            f".pth file") from None
    try:
        with torch.serialization.safe_globals(_safe_types()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and torch errors alike
        found = re.search(r"(?:GLOBAL |got <class ')([\w.]+)", str(e))
        if found:
            raise UserError(f"{path} holds a pickled {found.group(1)}, and sslprune loads checkpoints only "
                            f"with torch.load(weights_only=True); if you trust the file, load it yourself "
                            f"(torch.load(f, weights_only=False)), drop the entry holding that object, keep "
                            f"the dicts of tensors and torch.save the rest") from None
        raise UserError(f"cannot load {path} ({type(e).__name__}); expected a .pth/.pt/.pth.tar written by "
                        f"torch.save(...) or a .safetensors file") from None


def _safe_types() -> list:
    """What weights_only=True may build besides tensors and plain containers: DINO's "args" (a
    Namespace), and numpy numbers and numeric arrays (best-accuracy fields), under numpy 2's module
    paths and numpy 1's; never a numpy object array (its dtype is not here)."""
    import numpy as np
    core = getattr(np, "_core", None) or np.core
    numeric = {type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"}   # no "O": objects stay refused
    return [argparse.Namespace, np.dtype, np.ndarray, *numeric,
            core.multiarray._reconstruct, core.multiarray.scalar,
            (core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
            (core.multiarray.scalar, "numpy.core.multiarray.scalar")]


def candidates(obj: object) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """(wrapper path, tensors) of `obj` and of the dicts nested in it, breadth first, WRAPPERS first."""
    found, level = [], [("", obj)]
    for _ in range(MAX_DEPTH + 1):
        nxt = []
        for path, d in level:
            if not isinstance(d, dict):
                continue
            tensors = {k: v for k, v in d.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
            if tensors:
                found.append((path, tensors))
            subs = [(k, v) for k, v in d.items() if isinstance(k, str) and isinstance(v, dict)]
            subs.sort(key=lambda kv: WRAPPERS.index(kv[0]) if kv[0] in WRAPPERS else len(WRAPPERS))
            nxt += [(f"{path}.{k}" if path else k, v) for k, v in subs]
        level = nxt
    return found


def _split(sd: dict[str, torch.Tensor], prefix: str, rename: dict[str, str], backbone_keys: dict,
           head: str | None):
    """Strip `prefix`; keys the backbone has, its classifier, and everything else (full keys)."""
    tops = {k.split(".")[0] for k in backbone_keys}
    body, cls, dropped = {}, {}, []
    for k, v in sd.items():
        if not k.startswith(prefix):
            dropped.append(k)
            continue
        rest = k[len(prefix):]
        first, dot, tail = rest.partition(".")
        rest = rename.get(first, first) + dot + tail
        if head and rest.startswith(head + "."):
            cls[rest] = v
            dropped.append(k)
        elif rest.split(".")[0] in tops:
            body[rest] = v
        else:
            dropped.append(k)
    return body, cls, dropped


def _fits(body: dict, backbone_keys: dict) -> bool:
    keys = set(body)
    if keys == set(backbone_keys):
        return True
    return keys == {k for k in backbone_keys if not k.endswith("num_batches_tracked")}


def _name(prefix: str, rename: dict, wrapper: str, dropped: list[str]) -> str:
    """The registry layout with this prefix whose heads (and wrapper) best explain the dropped keys;
    the first in LAYOUTS on a tie, all of them ("sslprune/dino/...") when nothing tells them apart."""
    scored = []
    for name, lay in LAYOUTS.items():
        if prefix not in lay.keep or lay.rename != rename:
            continue
        hits = {p for p in lay.drop for k in dropped if k.startswith(p)}
        covered = sum(any(k.startswith(p) for p in lay.drop) for k in dropped)
        in_wrapper = any(w in wrapper.split(".") for w in lay.wrappers)
        scored.append(((len(hits), covered, in_wrapper), name))
    if not scored:
        return "custom"
    best = max(s for s, _ in scored)
    names = [n for s, n in scored if s == best]
    return names[0] if best != (0, 0, False) else "/".join(names)  # no evidence: all candidates


def _tried(sd: dict, backbone_keys: dict, prefix: str | None):
    """(prefix, rename) pairs to try on one state dict: the registry's, then derived ones."""
    pairs = []
    for lay in LAYOUTS.values():
        for p in lay.keep:
            if (prefix is None or p == prefix) and (p, lay.rename) not in pairs:
                pairs.append((p, lay.rename))
    first = next(iter(backbone_keys))
    derived = []
    for k in sd:
        if k == first or k.endswith("." + first):
            p = k[:len(k) - len(first)]
            if (prefix is None or p == prefix) and (p, {}) not in pairs and p not in derived:
                derived.append(p)
    if prefix is not None and not pairs and not derived:
        derived.append(prefix)
    return pairs, derived


def resolve(backbone: nn.Module, obj: object, path: Path, prefix: str | None = None) -> Match:
    """Find the backbone's tensors in a loaded checkpoint `obj`; UserError if none fit."""
    backbone_keys = backbone.state_dict()
    head = getattr(backbone, "torchvision_head", None)
    cands = candidates(obj)
    if not cands:
        raise UserError(f"{path} holds no tensors (a {type(obj).__name__}); pass a checkpoint or state dict")
    best = None  # (overlap, match) of the closest misfit, for the error message
    for wrapper, sd in cands:
        want = prefix
        if prefix and wrapper and prefix.startswith(wrapper + "."):
            want = prefix[len(wrapper) + 1:]  # the prefix was given with its wrapper path
        pairs, derived = _tried(sd, backbone_keys, want)
        fits = []
        # a derived prefix over an nn.Sequential of the ResNet's children: its keys start '0.', '4.0.', ...
        derived_pairs = [(p, _SEQUENTIAL_RESNET if any(k.startswith(p + "0.") for k in sd) else {}) for p in derived]
        for p, rename in pairs + derived_pairs:
            body, cls, dropped = _split(sd, p, rename, backbone_keys, head)
            m = Match(_name(p, rename, wrapper, dropped), p, wrapper, body, cls, dropped, head)
            if _fits(body, backbone_keys):
                if (p, rename) in pairs:
                    return _checked(m, backbone_keys, path)
                fits.append(m)
            overlap = len(set(body) & set(backbone_keys))
            if best is None or overlap > best[0]:
                best = (overlap, m)
        if len(fits) > 1:
            raise UserError(f"{path}: the backbone's keys appear under several prefixes "
                            f"({', '.join(repr(m.prefix) for m in fits)}"
                            f"{f' in {fits[0].wrapper!r}' if fits[0].wrapper else ''}); pick one with "
                            f"--pretrained-prefix")
        if fits:
            return _checked(fits[0], backbone_keys, path)
    overlap, m = best
    # another depth of the same family (ResNet-18 weights for ResNet-50) names its first misfit; a
    # single block of a backbone (a wrongly derived prefix) is no such misfit
    if overlap >= max(2, 0.5 * min(len(m.body), len(backbone_keys)), 0.2 * len(backbone_keys)):
        _checked(m, backbone_keys, path)  # names the first key that differs
    raise UserError(_no_layout(path, cands, prefix, backbone_keys))


def _checked(m: Match, backbone_keys: dict, path: Path) -> Match:
    where = f"{m.layout} layout, prefix {m.prefix!r}" + (f", wrapper {m.wrapper!r}" if m.wrapper else "")
    for k, v in backbone_keys.items():
        if k not in m.body:
            if k.endswith("num_batches_tracked") and _fits(m.body, backbone_keys):
                continue
            some = " (it has other layers' num_batches_tracked: all or none)" if k.endswith("num_batches_tracked") else ""
            raise UserError(f"{path} ({where}) does not match the backbone: it has no {k}{some} "
                            f"({_diff(m.body, backbone_keys)}); check --model")
        if m.body[k].shape != v.shape:
            raise UserError(f"{path} ({where}) does not match the backbone: {k} is "
                            f"{tuple(m.body[k].shape)} in the file, {tuple(v.shape)} in the model; "
                            f"check --model")
    extra = [k for k in m.body if k not in backbone_keys]
    if extra:
        raise UserError(f"{path} ({where}) does not match the backbone: the model has no {extra[0]} "
                        f"({_diff(m.body, backbone_keys)}); check --model")
    return m


def _diff(body: dict, backbone_keys: dict) -> str:
    missing = [k for k in backbone_keys if k not in body and not k.endswith("num_batches_tracked")]
    extra = [k for k in body if k not in backbone_keys]
    return f"{len(missing)} missing and {len(extra)} unexpected keys in all"


def _groups(keys) -> list[str]:
    """Distinct leading key components, as few as tell the keys apart: 'conv1.*', 'layer1.*' or
    'module.encoder_q.*', 'module.queue' (a whole key stands for itself)."""
    keys = list(keys)
    for n in (1, 2, 3):
        out = list(dict.fromkeys(".".join(k.split(".")[:n]) for k in keys))
        if len(out) > 1:
            break
    return [g if g in keys else g + ".*" for g in out]


def _no_layout(path: Path, cands, prefix: str | None, backbone_keys: dict) -> str:
    wrapper, sd = max(cands, key=lambda c: len(c[1]))
    found = ", ".join(_groups(sd)[:5])
    where = f" (in {wrapper!r})" if wrapper else ""
    first = next(iter(backbone_keys))
    if prefix is not None:
        return (f"{path} does not match the backbone under --pretrained-prefix {prefix!r}: its keys start "
                f"with {found}{where}; pass the part before {first!r} as --pretrained-prefix, or check --model")
    expected = ", ".join(repr(p) for p in dict.fromkeys(p for lay in LAYOUTS.values() for p in lay.keep))
    return (f"{path} does not match any known checkpoint layout: its keys start with {found}{where}; "
            f"expected the backbone's keys (e.g. {first!r}) under one of the prefixes {expected}; "
            f"check --model, or pass the part before {first!r} as --pretrained-prefix")


def dropped_groups(m: Match) -> list[str]:
    """Dropped keys as sorted prefix groups: 'module.encoder_k.*', 'module.encoder_q.fc.*', 'module.queue'."""
    out = set()
    depth = m.prefix.count(".")
    for k in m.dropped:
        if m.classifier and k.startswith(m.prefix + m.classifier + "."):
            out.add(m.prefix + m.classifier + ".*")
            continue
        n = depth + 1 if k.startswith(m.prefix) else len(_common(k, m.prefix)) + 1
        g = ".".join(k.split(".")[:n])
        out.add(g if g == k else g + ".*")
    return sorted(out)


def _common(key: str, prefix: str) -> list[str]:
    out = []
    for a, b in zip(key.split("."), prefix.split(".")[:-1]):
        if a != b:
            break
        out.append(a)
    return out


def load(backbone: nn.Module, path: str | Path, prefix: str | None = None) -> tuple[dict, dict]:
    """Load a checkpoint's backbone strictly into `backbone`. Returns (report, classifier tensors);
    `prefix` ("" = none) overrides detection, as --pretrained-prefix."""
    path = Path(path)
    m = resolve(backbone, read(path), path, prefix)
    missing, unexpected = backbone.load_state_dict(m.body, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    report = {"layout": m.layout, "prefix": m.prefix, "wrapper": m.wrapper, "loaded": len(m.body),
              "dropped": dropped_groups(m), "dropped_keys": len(m.dropped)}
    stem = m.body.get("conv1.weight")
    if m.layout == "solo-learn" and stem is not None and stem.shape[-1] == 3:   # (64, 3, 3, 3): a CIFAR stem
        # solo-learn's CIFAR ResNets (solo/methods/base.py) pad their 3x3 stem by 2, ours by 1: the
        # shapes agree, so nothing else would tell
        report["note"] = ("solo-learn's CIFAR stem pads by 2 and this network's by 1: its feature maps "
                          "are 2 pixels smaller than the ones these weights were trained on")
    return report, m.head


def describe(report: dict) -> str:
    """One line for the CLI: "pretrained: moco-v2 layout (prefix 'module.encoder_q.', wrapper
    'state_dict'): 318 tensors loaded, 3 head/projector key groups dropped (module.encoder_k.*, ...)"."""
    where = f"prefix {report['prefix']!r}" + (f", wrapper {report['wrapper']!r}" if report["wrapper"] else "")
    groups = report["dropped"]
    dropped = (f"{len(groups)} head/projector key group{'s' if len(groups) != 1 else ''} dropped "
               f"({', '.join(groups)})" if groups else "nothing dropped")
    note = f"; note: {report['note']}" if report.get("note") else ""
    return f"pretrained: {report['layout']} layout ({where}): {report['loaded']} tensors loaded, {dropped}{note}"
