"""Backbones: each returns features (B, feature_dim) and exposes `feature_dim`. Heads belong to tasks."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .alexnet import alexnet
from .convnet import ConvNet
from .gated import resnet18_cifar_gated, resnet20_gated
from .resnet import resnet18, resnet18_cifar, resnet20, resnet50
from .vgg import vgg19

MODELS = {
    "convnet": ConvNet,                # tests and the demo
    "resnet20": resnet20,              # He et al. CIFAR ResNet, 0.27M
    "resnet18_cifar": resnet18_cifar,  # the paper's CIFAR ResNet-18, 11.2M
    "vgg19": vgg19,                    # Morcos et al. VGG-19 (BN, one linear), 20M
    "resnet18": resnet18,              # torchvision layout
    "resnet50": resnet50,              # torchvision layout, 23.5M without fc
    "alexnet": alexnet,                # torchvision layout
}


# Gated variants (models/gated.py): the same network plus a gated path, for --budget.
GATED = {
    "resnet20": resnet20_gated,
    "resnet18_cifar": resnet18_cifar_gated,
}


def build_model(name: str, gated: bool = False) -> nn.Module:
    if name not in MODELS:
        raise UserError(f"unknown model '{name}'; choose one of: {', '.join(MODELS)}")
    if gated and name not in GATED:
        raise UserError(f"--budget trains a gated path, which --model {name} does not have; "
                        f"choose --model {' or '.join(GATED)}")
    return (GATED if gated else MODELS)[name]()


def build_backbone(exp) -> nn.Module:
    """The backbone of a config.Experiment: its model, gated when the experiment trains a gated path."""
    return build_model(exp.model.model, gated=exp.task.budget > 0)


def load_torchvision_state_dict(backbone: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Load a torchvision-layout state dict file (no key prefix) strictly into `backbone`; return the
    classifier's tensors (e.g. fc.weight, fc.bias) that a head may use. Loaded with weights_only=True."""
    from .checkpoints import load

    return load(backbone, path, prefix="")[1]


def load_pretrained(backbone: nn.Module, path: str | Path, prefix: str | None = None) -> dict:
    """Pre-trained backbone weights, strictly, from a safetensors file of ours (keys `backbone.*`, e.g.
    a level's model.safetensors), a torchvision-layout state dict (.pth/.pt/.safetensors, classifier
    ignored), or a public self-supervised checkpoint (MoCo, DINO, SwAV, SimCLR, solo-learn, lightly,
    VISSL; see checkpoints.py). `prefix` ("" = none; --pretrained-prefix) overrides detection.
    Returns the report of checkpoints.load: layout, prefix, wrapper, loaded, dropped, dropped_keys;
    checkpoints.describe(report) is its one-line summary."""
    from .checkpoints import load

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--pretrained {path} is not a file; pass a model.safetensors or a .pth state dict")
    return load(backbone, path, prefix)[0]
