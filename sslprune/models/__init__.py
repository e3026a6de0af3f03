"""Backbones: each returns features (B, feature_dim) and exposes `feature_dim`. Heads belong to tasks."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .alexnet import alexnet
from .convnet import ConvNet
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


def build_model(name: str) -> nn.Module:
    if name not in MODELS:
        raise UserError(f"unknown model '{name}'; choose one of: {', '.join(MODELS)}")
    return MODELS[name]()


def load_torchvision_state_dict(backbone: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Load a torchvision-layout state dict file strictly into `backbone`; return the classifier's
    tensors (e.g. fc.weight, fc.bias) that a head may use. Loaded with weights_only=True."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot load state dict {path} ({type(e).__name__}); expected a file "
                        f"written by torch.save(model.state_dict())") from None
    prefix = getattr(backbone, "torchvision_head", None)
    head = {k: v for k, v in sd.items() if prefix and k.startswith(prefix + ".")}
    body = {k: v for k, v in sd.items() if k not in head}
    try:
        missing, unexpected = backbone.load_state_dict(body, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise UserError(f"{path} does not match the backbone ({str(e).splitlines()[-1].strip()}); "
                        f"check --model") from None
    if missing or unexpected:
        raise UserError(f"{path} does not match the backbone: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]} (of {len(missing)}/{len(unexpected)}); check --model")
    return head


def load_pretrained(backbone: nn.Module, path: str | Path) -> None:
    """Pre-trained backbone weights, strictly: a safetensors file of ours (keys `backbone.*`, e.g. a
    level's model.safetensors) or a torchvision-layout state dict (.pth/.pt, classifier ignored)."""
    from ..layout import load_tensors

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--pretrained {path} is not a file; pass a model.safetensors or a .pth state dict")
    if path.suffix != ".safetensors":
        load_torchvision_state_dict(backbone, path)
        return
    tensors = load_tensors(path)
    body = {k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")}
    if not body:
        raise UserError(f"{path} holds no 'backbone.*' tensors; pass a model.safetensors written by sslprune")
    try:
        backbone.load_state_dict(body, strict=True)
    except RuntimeError as e:
        raise UserError(f"{path} does not match --model ({str(e).splitlines()[0]})") from None
