"""The Python API: sslprune's pruning and training loop for any `nn.Module`, from a notebook.

Everything here wraps what the CLI uses (sslprune.pruning, sslprune.train.train, the task
registry and the config dataclasses); nothing is re-implemented, so a mask or a trained network
made here is made exactly as `sslprune lottery` makes it.

A mask is a plain dict {parameter name: bool tensor}, one entry per Conv2d / Linear weight of the
model (names as in `model.named_parameters()`, e.g. "0.weight", "layer1.0.conv1.weight"), each of
that weight's shape, True = kept. Biases and batch-norm parameters are never pruned.

Bad input raises sslprune.errors.UserError with a one-line message that names the fix.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from . import pruning
from .errors import UserError
from .pruning import Mask, MaskEnforcer, density, dense_mask
from .tasks import TASKS

__all__ = ["Mask", "MaskEnforcer", "UserError", "apply_mask", "dense_mask", "density", "enforce_mask", "fit",
           "from_torch_prune", "infer_feature_dim", "prune_global", "to_torch_prune"]


# ---------------------------------------------------------------------------------------------
# Masks


def _torch_masked(module: nn.Module) -> list[str]:
    """The parameter names torch.nn.utils.prune has reparametrised in this module (not its children)."""
    return [n[:-len("_orig")] for n, _ in module.named_parameters(recurse=False) if n.endswith("_orig")
            and hasattr(module, n[:-len("_orig")] + "_mask")]


def _torch_pruned(model: nn.Module) -> list[str]:
    """Names of the modules that torch.nn.utils.prune has reparametrised (weight_orig + weight_mask)."""
    return [name or "<model>" for name, m in model.named_modules() if _torch_masked(m)]


def _require_plain(model: nn.Module) -> None:
    """Our masks act on plain weights; a torch-pruned weight is recomputed at every forward."""
    pruned = _torch_pruned(model)
    if pruned:
        raise UserError(f"{pruned[0]} is pruned with torch.nn.utils.prune (weight_orig/weight_mask); "
                        f"call sslprune.from_torch_prune(model) first to get its mask")


def _weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: weight} of the model's Conv2d / Linear layers; an error when it has none."""
    weights = pruning.prunable(model)
    if not weights:
        raise UserError(f"{type(model).__name__} has no Conv2d or Linear layer: nothing to prune; "
                        f"pass a model built from nn.Conv2d / nn.Linear")
    return weights


def _check_mask(model: nn.Module, mask: Mask) -> Mask:
    """`mask` checked against the model's prunable weights (same names, same shapes), as CPU bool
    tensors (what pruning.prune selects on)."""
    if not isinstance(mask, dict):
        raise UserError(f"mask must be a dict {{name: bool tensor}}, got {type(mask).__name__}; "
                        f"build one with sslprune.prune_global(model, fraction) or sslprune.dense_mask(model)")
    weights = _weights(model)
    missing, extra = sorted(set(weights) - set(mask)), sorted(set(mask) - set(weights))
    if missing or extra:
        raise UserError(f"mask does not match the model (missing {missing[:3]}, unknown {extra[:3]}); "
                        f"build it from this model with sslprune.prune_global(model, fraction) or "
                        f"sslprune.dense_mask(model)")
    for n, w in weights.items():
        m = mask[n]
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(w.shape):
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise UserError(f"mask['{n}'] is {shape}, the weight is {tuple(w.shape)}; "
                            f"build the mask from this model with sslprune.prune_global(model, fraction)")
    return {n: mask[n].detach().to("cpu", torch.bool) for n in weights}


def prune_global(model: nn.Module, fraction: float, mask: Mask | None = None, *, score: str = "magnitude",
                 generator: torch.Generator | None = None) -> Mask:
    """Global unstructured pruning (Han et al. 2015, as in the lottery-ticket papers): remove the
    `fraction` of the weights that survive `mask` (all weights when None) with the lowest score,
    ranked across all Conv2d / Linear layers together, so layers lose different shares.

    fraction in [0, 1): a share of the *surviving* weights (0.2 five times keeps 0.8^5 = 33%), so
    masks are nested: the result never revives a weight `mask` removed. score: "magnitude" (|w| of
    the model's current weights) or "random" (a baseline; draws from `generator`).

    Returns a new mask {name: bool tensor of the weight's shape, on the CPU}; the model is not
    modified (sslprune.apply_mask zeroes the pruned weights)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise UserError(f"fraction must be a number in [0, 1) (the share of surviving weights to remove, "
                        f"e.g. 0.2), got {fraction!r}")
    if score not in pruning.SCORES:
        raise UserError(f"unknown score '{score}'; choose one of: {', '.join(pruning.SCORES)}")
    _require_plain(model)
    mask = dense_mask(model) if mask is None else _check_mask(model, mask)
    if fraction == 0.0:
        return {n: m.clone() for n, m in mask.items()}
    try:
        return pruning.prune(pruning.SCORES[score](_weights(model), generator), mask, float(fraction))
    except ValueError as e:  # non-finite weights
        raise UserError(f"cannot prune: {e}; prune a model whose weights are finite") from None


def apply_mask(model: nn.Module, mask: Mask) -> nn.Module:
    """Zero every pruned weight of `model` in place (a weight keeps its value where mask is True).
    Returns the model, for chaining."""
    _require_plain(model)
    pruning.apply_mask(model, _check_mask(model, mask))
    return model


@contextlib.contextmanager
def enforce_mask(model: nn.Module, mask: Mask, optimizer: torch.optim.Optimizer) -> Iterator[MaskEnforcer]:
    """Keep pruned weights at exactly zero in your own training loop: zeroes them on entry, then
    after every `optimizer.step()` inside the block, and their gradients before it (optimizer step
    hooks, removed on exit). Without it, weight decay, momentum and Adam's running moments revive
    pruned weights, and a layer-wise optimizer (LARS) lets pruned gradients scale the kept weights'
    steps. Gradient clipping runs before step(): call `enforcer.gradients()` before clipping.

        with sslprune.enforce_mask(model, mask, optimizer):
            for x, y in loader:
                ...; loss.backward(); optimizer.step()

    The masks are copied once to the weights' device and memory format: move the model before
    entering. Yields the MaskEnforcer (call it to re-zero by hand, e.g. after loading weights)."""
    apply_mask(model, mask)
    enforcer = MaskEnforcer(model, _check_mask(model, mask))
    handles = (optimizer.register_step_pre_hook(lambda *_: enforcer.gradients()),
               optimizer.register_step_post_hook(lambda *_: enforcer()))
    try:
        yield enforcer
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------
# torch.nn.utils.prune


def _owners(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """{weight name: the module holding it}, for names as pruning.prunable gives them."""
    modules = dict(model.named_modules())
    return {n: modules[n.rpartition(".")[0]] for n in names}


def to_torch_prune(model: nn.Module, mask: Mask) -> nn.Module:
    """Hand a mask to torch.nn.utils.prune: every Conv2d / Linear gets `weight_orig` (the parameter,
    values unchanged) and a `weight_mask` buffer (float 0/1, the weight's shape), and computes
    weight = weight_orig * weight_mask before each forward (torch's custom_from_mask). Every layer
    is registered, dense ones with an all-ones mask, so from_torch_prune returns the same keys.

    Modifies `model` in place and returns it. Its parameters change (weight -> weight_orig): build
    the optimizer after this call."""
    _require_plain(model)
    mask = _check_mask(model, mask)
    for name, module in _owners(model, mask).items():
        torch_prune.custom_from_mask(module, "weight", mask[name].to(module.weight.device))
    return model


def from_torch_prune(model: nn.Module) -> Mask:
    """Back from torch.nn.utils.prune: read each Conv2d / Linear `weight_mask` into our mask and
    make the pruning permanent (torch's prune.remove: weight = weight_orig * weight_mask, a plain
    parameter again, pruned entries exactly zero). Layers torch did not prune are dense in the mask.

    Modifies `model` in place; returns the mask {name: bool tensor}. Its parameters change
    (weight_orig -> weight): build the optimizer after this call."""
    owners = _owners(model, _weights(model))
    for name, module in model.named_modules():
        for param in _torch_masked(module):
            if param != "weight" or not isinstance(module, (nn.Conv2d, nn.Linear)):
                raise UserError(f"torch.nn.utils.prune pruned {name or '<model>'}.{param}; sslprune masks cover "
                                f"Conv2d / Linear weights only: call torch.nn.utils.prune.remove on it first")
    mask = {}
    for name, module in owners.items():
        if "weight" in _torch_masked(module):
            mask[name] = module.weight_mask.detach().to("cpu", torch.bool)
            torch_prune.remove(module, "weight")
        else:
            mask[name] = torch.ones(module.weight.shape, dtype=torch.bool)
    return mask


# ---------------------------------------------------------------------------------------------
# Training


@torch.no_grad()
def infer_feature_dim(backbone: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """D of the backbone's features (B, D), from one forward pass of two zero images of
    `input_shape` (3, H, W) in eval mode (batch-norm statistics untouched; the mode is restored).
    Backbones that set `feature_dim` (sslprune.models) need no forward pass."""
    if isinstance(getattr(backbone, "feature_dim", None), int):
        return backbone.feature_dim
    param = next(backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = backbone.training
    backbone.eval()
    try:
        out = backbone(torch.zeros(2, *input_shape, device=device))
    except Exception as e:
        raise UserError(f"the backbone fails on images of shape (B, {', '.join(map(str, input_shape))}) "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"pass images of the size it takes") from None
    finally:
        backbone.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"the backbone returns {shape}, not features (B, D); end it with "
                        f"nn.AdaptiveAvgPool2d(1), nn.Flatten() (heads belong to the objective)")
    return int(out.shape[1])


def _split(images, labels, what: str):
    """(images (N, 3, H, W) uint8 on the CPU, labels (N,) int64 or None) from tensors, NumPy arrays
    or batches."""
    if hasattr(images, "__array__") and not isinstance(images, torch.Tensor):  # NumPy
        images = torch.as_tensor(images)
    if not isinstance(images, torch.Tensor):
        if labels is not None:
            raise UserError(f"{what}: a DataLoader brings its own labels; drop the labels argument")
        images, labels = _materialise(images, what)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise UserError(f"{what} must be uint8 (N, 3, H, W) in 0-255, got {images.dtype} "
                        f"{tuple(images.shape)}; convert 0-1 floats with (x * 255).round().to(torch.uint8) "
                        f"(torchvision: PILToTensor instead of ToTensor)")
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.shape != (len(images),) or labels.is_floating_point() or labels.dtype == torch.bool:
            raise UserError(f"{what} labels must be integers (N,) = ({len(images)},), got {labels.dtype} "
                            f"{tuple(labels.shape)}; pass one class index per image")
        labels = labels.to("cpu", torch.int64)
    if not len(images):
        raise UserError(f"{what} holds no image; pass at least one")
    return images.cpu(), labels


def _materialise(batches, what: str):
    """Every batch of a DataLoader (or any iterable of (images, labels) or of images), concatenated
    on the CPU: (images, labels), labels None when the batches carry none."""
    try:
        batches = iter(batches)
    except TypeError:
        raise UserError(f"{what} must be a uint8 tensor (N, 3, H, W) or a DataLoader of (images, labels) "
                        f"batches, got {type(batches).__name__}") from None
    xs, ys = [], []
    for batch in batches:
        x, y = (batch[0], batch[1] if len(batch) > 1 else None) if isinstance(batch, (tuple, list)) else (batch, None)
        if not isinstance(x, torch.Tensor):
            raise UserError(f"{what}: a batch holds {type(x).__name__} images; make the DataLoader yield "
                            f"(images, labels) tensors (torchvision: PILToTensor)")
        xs.append(x.cpu())
        ys.append(None if y is None else torch.as_tensor(y).cpu())
    if not xs:
        raise UserError(f"{what}: the DataLoader yielded no batch; pass a non-empty one")
    labels = None if any(y is None for y in ys) else torch.cat(ys)
    return torch.cat(xs), labels


def _test_split(test):
    """The held-out split: (images, labels), a DataLoader, or None (none)."""
    if test is None:
        return None, None
    if isinstance(test, (tuple, list)):
        if len(test) != 2:
            raise UserError("test must be (images, labels) or a DataLoader; pass test=(images, labels)")
        return _split(test[0], test[1], "test")
    return _split(test, None, "test")


def _route(options: dict) -> tuple[dict, dict, dict]:
    """fit's **options split into the fields of config.Train, config.Task and config.Data (field
    names are unique across them); anything else is an error listing what is valid."""
    from .config import Task, Train

    allowed = ({f.name for f in dataclasses.fields(Train)} - {"epochs", "batch_size", "lr", "optimizer"},
               {f.name for f in dataclasses.fields(Task)} - {"task"}, {"crop_pad", "flip"})
    routed = ({}, {}, {})
    for key, value in options.items():
        where = next((i for i, names in enumerate(allowed) if key in names), None)
        if where is None:
            raise UserError(f"unknown option '{key}'; valid: {', '.join(sorted(set().union(*allowed)))}")
        routed[where][key] = tuple(value) if isinstance(value, list) else value
    return routed


def _configs(objective: str, epochs: int, batch_size: int, lr: float, optimizer: str, options: dict):
    """The config dataclasses the CLI would build, from fit's arguments, validated as the CLI does."""
    from .config import Data, Experiment, Model, Task, Train

    if objective not in TASKS:
        raise UserError(f"unknown objective '{objective}'; choose one of: {', '.join(TASKS)}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a whole number >= 1, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise UserError(f"lr must be a finite number > 0 (e.g. 1e-3 with Adam), got {lr!r}")
    train_opts, task_opts, data_opts = _route(options)
    train = Train(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, **train_opts)
    task, aug = Task(task=objective, **task_opts), Data(**data_opts)
    # the CLI's checks; placeholder dataset and model names (fit brings its own data and backbone)
    Experiment(data=dataclasses.replace(aug, dataset="digits"), model=Model(model="convnet"),
               task=task, train=train).validate()
    return train, task, aug


def _dataset(images, labels, test, objective_cfg):
    """The in-memory Dataset train() takes, with the labels the objective may see (labelled.py)."""
    from .config import Experiment
    from .data import Dataset, Split
    from .labelled import labelled_subset_checked, restrict_labels

    needs_labels = bool(TASKS[objective_cfg.task].unlabelled)   # it trains on labels
    if labels is None and needs_labels:
        raise UserError(f"objective '{objective_cfg.task}' trains on labels; pass labels (N,) or a "
                        f"DataLoader of (images, labels), or pick objective='rotation'")
    labels = torch.zeros(len(images), dtype=torch.int64) if labels is None else labels
    test_x, test_y = test
    if test_x is None:  # no held-out data: the metrics measure the training images
        test_x, test_y = images, labels
    elif test_y is None:
        if needs_labels:
            raise UserError(f"objective '{objective_cfg.task}' is evaluated on labels; pass test=(images, labels)")
        test_y = torch.zeros(len(test_x), dtype=torch.int64)
    if labels.min() < 0 or test_y.min() < 0:
        raise UserError("labels must be class indices >= 0; hide labels with the label_fraction option instead")
    classes = [str(c) for c in range(int(max(labels.max(), test_y.max())) + 1)]
    data = Dataset("fit", Split(images, labels), Split(test_x, test_y), classes)
    if not objective_cfg.label_fraction or objective_cfg.label_fraction == 1.0:
        return data
    exp = Experiment(task=objective_cfg)
    return restrict_labels(data, labelled_subset_checked(exp, data),
                           drop_unlabelled=TASKS[objective_cfg.task].unlabelled == "drop")


def _check_sizes(task_cfg, train_cfg, data) -> None:
    """What the objectives need of the data (the CLI's lottery.check_data, in fit's argument names)."""
    n = len(data.train)
    if train_cfg.batch_size > n:
        raise UserError(f"batch_size={train_cfg.batch_size} exceeds the {n} training images; pass at most {n}")
    with _in_argument_names():   # the task's own checks, in fit's argument names
        TASKS[task_cfg.task].check_data(task_cfg, train_cfg, data)


def _objective(task_cfg, backbone: nn.Module, data, seed: int):
    """The objective's head (and state, e.g. NPID's bank), sized for the backbone's features and the
    data; initialised under `seed`, as lottery.build does."""
    from .tasks import build_task

    dim = infer_feature_dim(backbone, data.train.image_shape)
    torch.manual_seed(seed)
    return build_task(task_cfg, dim, data.num_classes, len(data.train))


def _train(backbone, task, data, train_cfg, aug, mask, out, seed, device, progress) -> dict:
    """sslprune.train.train into `out`, or into a temporary directory deleted afterwards (out=None);
    the backbone goes back to the train/eval mode it came in."""
    from .runtime import Runtime
    from .train import train

    was_training = backbone.training
    with contextlib.ExitStack() as stack:
        run_dir = out if out is not None else stack.enter_context(tempfile.TemporaryDirectory(prefix="sslprune-fit-"))
        metrics = train(backbone, task, data, train_cfg, aug, mask, Path(run_dir), seed=seed,
                        runtime=Runtime(device=device), progress=progress)
    backbone.train(was_training)
    return metrics


@contextlib.contextmanager
def _in_argument_names() -> Iterator[None]:
    """The CLI's checks name flags (--label-fraction, --task); fit's user knows them as arguments
    (label_fraction, objective): the same one-line message, in those words."""
    try:
        yield
    except UserError as e:
        words = re.sub(r"--([a-z][a-z0-9-]*)", lambda m: "objective" if m[1] == "task" else m[1].replace("-", "_"),
                       str(e))
        raise UserError(words) from None


def fit(backbone: nn.Module, images, labels=None, *, objective: str = "labels", test=None,
        mask: Mask | None = None, epochs: int = 1, batch_size: int = 64, lr: float = 1e-3,
        optimizer: str = "adam", seed: int = 0, device: str = "cpu", out: str | Path | None = None,
        progress: bool = False, **options) -> dict:
    """Train `backbone` with one of sslprune's objectives, under `mask`, with the CLI's loop
    (sslprune.train.train): the objective's head is built here and thrown away afterwards; the
    backbone is trained in place, pruned weights held at exactly zero.

    backbone: any nn.Module mapping normalised images (B, 3, H, W) to features (B, D). D is its
        `feature_dim` attribute when it has one, else found by a forward pass (infer_feature_dim).
    images: uint8 (N, 3, H, W) in 0-255, with labels (N,) class indices; or a DataLoader (or any
        iterable) of (images, labels) batches or of image batches. A DataLoader is read once, into
        memory, before training: its shuffling and random transforms are applied once, not per
        epoch (use crop_pad / flip for per-epoch augmentation); its images must be uint8 too.
        The network sees them normalised by the training images' per-channel mean and std.
    labels: needed by objectives "labels" and "s4l"; "rotation" and "exemplar" ignore them;
        "npid" trains without them, but its test_acc (a kNN monitor) is meaningless without them.
    objective: a key of sslprune.tasks.TASKS: labels | rotation | exemplar | npid | s4l.
    test: held-out (images, labels) or a DataLoader, evaluated after every epoch (test_* metrics);
        None evaluates the training images instead.
    mask: from prune_global (None = dense); pruned weights are zeroed first and stay zero.
    options: any other field of sslprune.config.Train (momentum, weight_decay, schedule,
        milestones, gamma, warmup_epochs), of sslprune.config.Task (label_fraction, embedding_dim,
        knn, nce_negatives, ...) and of sslprune.config.Data's crop_pad and flip.
    out: a directory for checkpoints, log.jsonl and model.safetensors (backbone.* and task.*
        tensors): the same call again resumes there, or loads the finished run without training.
        None trains in a temporary directory, deleted afterwards.
    seed: data order, augmentation and the head's initialisation; seeds torch's global RNG.
    device: "cpu", "cuda", ...; bf16 autocast on a CUDA GPU that supports it (sslprune.runtime).

    Returns the last epoch's metrics, as in the CLI's done.json: train_loss, train_acc, test_loss,
    test_acc (the objective's accuracy: rotation accuracy for "rotation"), and per-objective extras.
    The backbone is left on `device`, in the channels_last memory format training used (outputs
    are the same; .to(memory_format=torch.contiguous_format) undoes it), and in the train/eval
    mode it came in."""
    with _in_argument_names():
        train_cfg, task_cfg, aug = _configs(objective, epochs, batch_size, lr, optimizer, options)
        _require_plain(backbone)
        mask = dense_mask(backbone) if mask is None else _check_mask(backbone, mask)
        data = _dataset(*_split(images, labels, "images"), _test_split(test), task_cfg)
        _check_sizes(task_cfg, train_cfg, data)
        task = _objective(task_cfg, backbone, data, seed)
        metrics = _train(backbone, task, data, train_cfg, aug, mask, out, seed, device, progress)
    return {k: v for k, v in metrics.items() if k != "files"}  # files: checksums of run_dir's files
