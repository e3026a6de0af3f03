"""Standalone networks out of a run: `sslprune export` and `load_exported`.

A channel-granularity level becomes a physically smaller dense network (dead channels removed from
its convs, batch-norm layers and the next layers' inputs: `channels.compact`); a weight-granularity
level stays the dense network with its pruned weights at zero (same kernels, so no speed-up: the
provenance says so). A lottery level exports its backbone (images -> features); a level re-trained
on labels (`--retrain RESET`) exports with its label head (images -> class logits).

An export folder holds
    model.safetensors   torchvision-style keys (conv1.weight, layer1.0.bn1.running_mean, ..., fc.weight)
    export.json         architecture, input normalisation, provenance, params and MACs, sha256 of the files
    model.onnx          (--format onnx) the same network for onnxruntime, dynamic batch size

Inputs are float images on the 0-1 scale, (B, 3, H, W): the training set's channel normalisation is
part of the exported network.

    from sslprune.export import load_exported
    net = load_exported("small/")        # an nn.Module in eval mode, verified against export.json
    logits_or_features = net(images)
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from . import channels, layout
from .errors import UserError
from .cost import count
from .models import build_model
from .models.gated import compact_gated, dense_state, opened_channels
from .pruning import apply_mask, density

FORMATS = ("safetensors", "onnx")
HEAD = "fc"  # the label head's key prefix in an exported file (torchvision's, for every model)


class Standalone(nn.Module):
    """normalise -> backbone -> optional linear head: what a level computes, as one module. path:
    a gated backbone's path (models/gated.py), None for any other backbone."""

    def __init__(self, backbone: nn.Module, head: nn.Linear | None, mean, std, path: str | None = None):
        super().__init__()
        self.backbone, self.head, self.path = backbone, head, path
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-3).view(1, -1, 1, 1),
                             persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:   # (B, 3, H, W) on the 0-1 scale
        x = (images - self.mean) / self.std
        features = self.backbone(x) if self.path is None else self.backbone(x, path=self.path)  # (B, feature_dim)
        return features if self.head is None else self.head(features)

    def tensors(self) -> dict[str, torch.Tensor]:
        """torchvision-style keys: the backbone's own, the head as fc.*"""
        out = dict(self.backbone.state_dict())
        if self.head is not None:
            out |= {f"{HEAD}.{k}": v for k, v in self.head.state_dict().items()}
        return out


def level_network(exp_dir: Path, replicate: int, level: int, reset: str | None = None,
                  path: str = "dense") -> tuple[Standalone, dict]:
    """A trained level as a Standalone network (masked, not yet compact) and its provenance. A run
    trained with --budget has two paths: "dense" gives an ordinary ResNet (the dense path's weights),
    "gated" the gated ResNet computing its gated path."""
    from .lottery import load_experiment

    exp, saved = load_experiment(exp_dir)
    ldir = layout.level_dir(exp_dir, replicate, level)
    run = layout.run_dir(ldir, reset)
    if not layout.is_done(run):
        what = "sslprune lottery" if reset is None else f"sslprune retrain {exp_dir} --variants {reset}"
        raise UserError(f"level {level} of replicate {replicate} is not trained ({run} has no "
                        f"{layout.DONE}); run '{what}' first, or pick a trained level")
    mask_path = run / layout.MASK if (run / layout.MASK).exists() else ldir / layout.MASK
    mask = layout.load_mask(mask_path)
    tensors = layout.load_model(run)
    if path not in ("dense", "gated"):
        raise UserError(f"unknown --path {path}; choose from dense, gated")
    gated = exp.task.budget > 0
    if path == "gated" and not gated:
        raise UserError("--path gated exports the gated path of a run trained with --budget; this run has none: "
                        "drop --path")
    state = {k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")}
    backbone = build_model(exp.model.model, gated=path == "gated")
    backbone.load_state_dict(dense_state(state) if gated and path == "dense" else state)
    apply_mask(backbone, {n: m for n, m in mask.items() if n in dict(backbone.named_parameters())})  # already zero; certain
    head = None
    if reset is not None:  # re-trained on labels: the task's linear head
        w, b = tensors["task.head.weight"], tensors["task.head.bias"]
        head = nn.Linear(w.shape[1], w.shape[0])
        head.load_state_dict({"weight": w, "bias": b})
    shape, mean, std = input_spec(exp_dir, exp, saved)
    info = {"source": {"run": Path(exp_dir).name, "replicate": replicate, "level": level,
                       "trained": run.relative_to(exp_dir).as_posix(), "git": saved.get("git")},
            "model": exp.model.model, **({"path": path} if gated else {}),
            "granularity": exp.prune.granularity, "remaining": density(mask),
            "input": {"shape": list(shape), "mean": mean, "std": std, "scale": "0-1"},
            "head": None if head is None else {"prefix": HEAD, "classes": head.out_features}}
    return Standalone(backbone, head, mean, std, "gated" if path == "gated" else None).eval(), info | {"_mask": mask}


def input_spec(exp_dir: Path, exp, saved: dict) -> tuple[tuple[int, int, int], list[float], list[float]]:
    """(C, H, W) and the channel mean and std a run's network expects: recorded in config.json by
    `prepare`; for runs made before that, read once from the run's data (and then recorded)."""
    if "input" not in saved:
        from .data import load_dataset
        from .lottery import input_record
        try:
            data = load_dataset(exp.data, saved.get("data_root"))
        except UserError as e:
            raise UserError(f"{exp_dir} predates recorded input statistics and its data is not readable "
                            f"({e})") from None
        saved["input"] = input_record(data)
        layout.save_json(Path(exp_dir) / layout.CONFIG, saved)
    spec = saved["input"]
    return tuple(spec["shape"]), spec["mean"], spec["std"]


def compact_network(net: Standalone, granularity: str, mask) -> Standalone:
    """Channel granularity: the physically smaller network; weight granularity: `net` itself."""
    if granularity != "channel":
        return net
    groups = channels.channel_groups(net.backbone)
    alive = channels.check_mask_is_channels(groups, mask, net.backbone)
    backbone, head = channels.compact(net.backbone, groups, alive, net.head)
    return Standalone(backbone, head, net.mean.flatten(), net.std.flatten()).eval()


def export(exp_dir: Path, replicate: int, level: int, out: Path, formats=("safetensors",),
           reset: str | None = None, path: str = "dense") -> dict:
    """Write a level's standalone network to `out`; returns what export.json says."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UserError(f"unknown --format {unknown[0]}; choose from {', '.join(FORMATS)}")
    if "onnx" in formats:
        _need_onnx()
    _check_out(Path(out))
    net, info = level_network(Path(exp_dir), replicate, level, reset, path)
    masked, mask = net, info.pop("_mask")
    shape = tuple(info["input"]["shape"])
    if path == "gated":  # channels the gated path never opens on the training split go; checked on those images
        net, x, note = _compact_gated(Path(exp_dir), net, info)
    else:
        net = compact_network(net, info["granularity"], mask)
        x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
        note = ("channels removed: a smaller dense network" if info["granularity"] == "channel" else
                "weight granularity: the dense network with pruned weights at zero; same kernels, no speed-up")
    if net is not masked:  # the invariant, checked on every export: compact computes what masked does
        _check_outputs("the compact network", net, masked, x)
    info |= {"cost": count(net, shape), "dense_cost": count(build_dense({**info, "path": None}, "meta"), shape),
             "note": note}
    return write_export(net, info, Path(out), formats, x)


def _check_out(out: Path) -> None:
    """--out is a new or empty folder, or an earlier (or interrupted) export's: never a folder of other
    files (a run's train/ folder also holds a model.safetensors, which the export would replace)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder")
    ours = {layout.EXPORT_MODEL, layout.EXPORT_ONNX, layout.EXPORT_INFO}   # an interrupted export's, redone
    others = sorted(p.name for p in out.iterdir() if p.name not in ours and not layout.is_temporary(p)) \
        if out.is_dir() else []
    if others:
        raise UserError(f"--out {out} holds files that are no sslprune export ({', '.join(others[:3])}"
                        f"{', ...' if len(others) > 3 else ''}); pass a new or empty folder")


def _compact_gated(exp_dir: Path, net: Standalone, info: dict) -> tuple[Standalone, torch.Tensor, str]:
    """The gated path without the channels it never opens on the run's training split (no
    augmentation), and 64 of those images (0-1 floats) to check it on."""
    from .data import load_dataset
    from .lottery import load_experiment

    exp, saved = load_experiment(exp_dir)
    images = load_dataset(exp.data, saved.get("data_root")).train.images          # (N, 3, H, W) uint8
    keep = opened_channels(net.backbone, images, lambda x: (x.float() / 255 - net.mean) / net.std)
    info["gated_channels"] = {"kept": sum(int(k.sum()) for k in keep), "of": sum(len(k) for k in keep)}
    small = Standalone(compact_gated(net.backbone, keep), net.head, net.mean.flatten(), net.std.flatten(), "gated")
    x = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:64]].float() / 255
    note = (f"gated path: {info['gated_channels']['kept']} of {info['gated_channels']['of']} gated channels kept "
            f"(the others never open on the training split); the kept ones are gated per image, MACs counted "
            f"with every kept channel open")
    return small.eval(), x, note


def write_export(net: Standalone, info: dict, out: Path, formats=("safetensors",), x: torch.Tensor | None = None) -> dict:
    """The export folder of a network: model.safetensors, [model.onnx, checked by onnxruntime on x],
    then export.json with the files' sha256 (written last: it marks the export complete)."""
    shape = tuple(info["input"]["shape"])
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(0)) if x is None else x
    if (out / layout.EXPORT_INFO).exists() and layout.load_json(out / layout.EXPORT_INFO).get("source") != info.get("source"):
        raise UserError(f"{out} holds the export of another network; pass another --out or move it away")
    files = {}
    layout.save_tensors(out / layout.EXPORT_MODEL, net.tensors())
    # the file as a user loads it computes what `net` does (layer widths read back from the tensors)
    _check_outputs(f"{out / layout.EXPORT_MODEL}, read back,", _network(info, layout.load_tensors(out / layout.EXPORT_MODEL)),
                   net, x)
    files[layout.EXPORT_MODEL] = _sha256(out / layout.EXPORT_MODEL)
    if "onnx" in formats:
        layout.save_bytes(out / layout.EXPORT_ONNX, onnx_bytes(net, shape))
        check_onnx(out / layout.EXPORT_ONNX, net, x)
        files[layout.EXPORT_ONNX] = _sha256(out / layout.EXPORT_ONNX)
    info = {**info, "files": files}
    layout.save_json(out / layout.EXPORT_INFO, info)
    return info


def build_dense(info: dict, device: str = "cpu") -> Standalone:
    """The dense network of an export's architecture (random weights; on "meta": shapes only, the
    cost reference)."""
    gated = info.get("path") == "gated"
    with torch.device(device):
        backbone = build_model(info["model"], gated=gated)
    head = None if info["head"] is None else nn.Linear(backbone.feature_dim, info["head"]["classes"])
    return Standalone(backbone, head, info["input"]["mean"], info["input"]["std"], "gated" if gated else None).eval()


def load_exported(folder: str | Path) -> Standalone:
    """The network an `sslprune export` folder holds, in eval mode. Its files are checked against the
    sha256 recorded in export.json; layer widths come from the tensors themselves."""
    folder = Path(folder)
    info = layout.load_json(folder / layout.EXPORT_INFO) if (folder / layout.EXPORT_INFO).exists() else None
    if info is None:
        raise UserError(f"{folder} holds no {layout.EXPORT_INFO}; pass a folder written by 'sslprune export'")
    path = folder / layout.EXPORT_MODEL
    if _sha256(path) != info["files"].get(layout.EXPORT_MODEL):
        raise UserError(f"{path} does not match the sha256 in {layout.EXPORT_INFO}: it was damaged or replaced; "
                        f"export it again")
    return _network(info, layout.load_tensors(path))


def _network(info: dict, tensors: dict[str, torch.Tensor]) -> Standalone:
    """The export's architecture (info) holding `tensors`, each layer as wide as its tensors, in eval mode."""
    net = build_dense(info)
    body = {k: v for k, v in tensors.items() if not k.startswith(f"{HEAD}.")}
    _resize(net.backbone, body)
    net.backbone.load_state_dict(body, strict=True)
    if net.head is not None:
        w = tensors[f"{HEAD}.weight"]
        net.head = nn.Linear(w.shape[1], w.shape[0])
        net.head.load_state_dict({"weight": w, "bias": tensors[f"{HEAD}.bias"]})
    return net.eval()


def _resize(backbone: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Give every conv, linear and batch-norm layer the shapes its tensors have (a compact network's)."""
    for name, m in backbone.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = tensors[f"{prefix}weight"]
            m.weight = nn.Parameter(torch.empty_like(w))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(w.shape[0]))
            if isinstance(m, nn.Conv2d):
                m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups
            else:
                m.out_features, m.in_features = w.shape
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = tensors[f"{prefix}running_mean"].shape[0]
            m.num_features = c
            m.weight, m.bias = nn.Parameter(torch.empty(c)), nn.Parameter(torch.empty(c))
            m.running_mean, m.running_var = torch.empty(c), torch.empty(c)


def _need_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError("--format onnx needs onnx, onnxscript and onnxruntime: pip install 'sslprune[export]'") from None


def onnx_bytes(net: nn.Module, shape: tuple[int, int, int]) -> bytes:
    """The network as one ONNX file (torch.export-based exporter), batch size dynamic."""
    _need_onnx()
    import onnx

    example = torch.zeros(2, *shape)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(net, (example,), dynamo=True, verbose=False, input_names=["images"],
                                        output_names=["output"],
                                        dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
    finally:
        quiet.setLevel(level)
    return onnx.ModelProto.SerializeToString(program.model_proto)


def onnx_session(path: Path, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # no busy-waiting between calls: an idle session's spinning threads would slow the one being timed
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_onnx(path: Path, net: nn.Module, x: torch.Tensor) -> None:
    """onnxruntime runs the file and gives what PyTorch gives (fp32 tolerance)."""
    _check_outputs(f"{path} under onnxruntime",
                   lambda v: torch.from_numpy(onnx_session(path).run(None, {"images": v.numpy()})[0]), net, x)


def _check_outputs(what: str, got, net: nn.Module, x: torch.Tensor) -> None:
    """got(x) is net(x) to fp32 tolerance, or the export stops before export.json marks it complete."""
    with torch.no_grad():
        want, have = net(x), got(x)
    err = float((have - want).abs().max())
    if not err <= 1e-4 * max(1.0, float(want.abs().max())):
        raise UserError(f"{what} differs from the network it was made from by {err:.3g}; please report this")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()

