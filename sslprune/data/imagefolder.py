"""An ImageFolder tree, `root/train/<class>/*` and `root/test/<class>/*` (or `val/`), given as a
folder or as a .tar.gz of that tree (as in shared/data). Images are decoded once with Pillow and
cached as safetensors in a cache folder, so the second load is fast.

Classes are the sorted folder names of the training split (torchvision's ImageFolder order).
With stream=True (--stream) the training split stays on disk and is decoded every epoch
(sslprune/data/stream.py); only the test split is decoded once and cached.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..layout import load_tensors, save_tensors
from .images import EXTENSIONS, decode
from .stream import scan
from .tensors import Dataset, Split

SPLITS = ("train", "test", "val")


def cache_dir() -> Path:
    return Path(os.environ.get("SSLPRUNE_CACHE", Path.home() / ".cache" / "sslprune"))


def _entries(root: Path, splits=SPLITS) -> dict[str, dict[str, list[tuple[str, object]]]]:
    """{split: {class: [(file name, opener)]}} for a folder or a .tar.gz of one."""
    out: dict = {}
    if root.is_dir():
        for split in splits:
            if not (root / split).is_dir():
                continue
            for cdir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
                files = [p for p in cdir.iterdir() if p.suffix.lower() in EXTENSIONS]
                out.setdefault(split, {})[cdir.name] = [(p.name, p.read_bytes) for p in files]
        return out
    try:
        with tarfile.open(root, "r:*") as t:
            for m in t:
                parts = Path(m.name).parts
                if not m.isfile() or len(parts) < 3 or parts[-3] not in SPLITS:
                    continue
                if Path(parts[-1]).suffix.lower() not in EXTENSIONS:
                    continue
                data = t.extractfile(m).read()
                out.setdefault(parts[-3], {}).setdefault(parts[-2], []).append(
                    (parts[-1], (lambda d=data: d)))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"cannot read archive {root} ({e}); pass an ImageFolder folder or an "
                        f"intact .tar.gz of one") from None
    return out


def _read_split(root: Path, tree: dict, split: str, index: dict[str, int], limit: int, image_size: int) -> Split:
    images, labels = [], []
    for c in sorted(tree[split]):
        if c not in index:
            raise UserError(f"class '{c}' is in {split}/ but not in train/ of {root}")
        files = sorted(tree[split][c], key=lambda e: e[0])
        if not files:
            raise UserError(f"class folder {split}/{c} of {root} holds no images; remove it or add images")
        for name, read in files[: limit or None]:
            images.append(decode(read(), image_size, f"{split}/{c}/{name}"))
            labels.append(index[c])
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise UserError(f"images in {root}/{split} have different sizes ({len(shapes)} kinds); "
                        f"pass --image-size N to resize them")
    return Split(torch.from_numpy(np.stack(images)), torch.tensor(labels))


def _not_a_tree(root: Path, found) -> UserError:
    return UserError(f"{root} is not an ImageFolder tree: expected train/<class>/<image> and "
                     f"test/<class>/<image> (or val/); found splits {sorted(found) or 'none'}")


def _read(root: Path, image_size: int, train_per_class: int, test_per_class: int) -> Dataset:
    tree = _entries(root)
    if "train" not in tree or not ({"test", "val"} & set(tree)):
        raise _not_a_tree(root, tree)
    classes = sorted(tree["train"])
    index = {c: i for i, c in enumerate(classes)}
    test = "test" if "test" in tree else "val"
    return Dataset(root.name, _read_split(root, tree, "train", index, train_per_class, image_size),
                   _read_split(root, tree, test, index, test_per_class, image_size), classes)


def _cached(files: list[Path], root: Path, options: list, build) -> dict[str, torch.Tensor]:
    """build() -> tensors, cached under a key of `options` and every file's path, size and mtime
    (a folder's own mtime does not change when a file inside it is rewritten)."""
    stamp = hashlib.sha256()
    for p in files:
        st = p.stat()
        stamp.update(f"{p.relative_to(root) if p != root else p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    key = json.dumps([str(root), stamp.hexdigest(), *options])
    cached = cache_dir() / f"imagefolder-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if cached.exists():
        return load_tensors(cached)
    tensors = build()
    save_tensors(cached, tensors)
    return tensors


def _meta(tensors: dict) -> dict:
    return json.loads(tensors.pop("classes_json").numpy().tobytes().decode())


def _blob(meta: dict) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)


def _streamed(root: Path, image_size: int, train_per_class: int, test_per_class: int) -> Dataset:
    """The training split as files on disk; the test split decoded (cached) as in memory."""
    if not root.is_dir():
        raise UserError(f"--stream reads training images at random, which a .tar.gz cannot serve: extract "
                        f"{root} (tar xzf) and pass the folder as --data-root")
    found = [s for s in SPLITS if (root / s).is_dir()]
    if "train" not in found or not ({"test", "val"} & set(found)):
        raise _not_a_tree(root, found)
    if not image_size:
        raise UserError("--stream crops every training image to --image-size: pass --image-size N (224 for ImageNet)")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    test = "test" if "test" in found else "val"

    def build():
        split = _read_split(root, _entries(root, (test,)), test, {c: i for i, c in enumerate(classes)},
                            test_per_class, image_size)
        return {"images": split.images, "labels": split.labels, "classes_json": _blob({"classes": classes})}
    t = _cached(sorted((root / test).rglob("*")), root, [test, image_size, test_per_class, classes, "stream", 1],
                build)  # the classes of train/ number the test labels
    _meta(t)  # its class list is in the key already
    return Dataset(root.name, scan(root, "train", classes, train_per_class, image_size),
                   Split(t["images"], t["labels"]), classes)


def load_imagefolder(root, image_size: int = 0, train_per_class: int = 0, test_per_class: int = 0,
                     stream: bool = False, **_) -> Dataset:
    if not root:
        raise UserError("--data-root is required for --dataset imagefolder (a folder with train/ "
                        "and test/, or a .tar.gz of one)")
    root = Path(root).resolve()
    if not root.exists():
        raise UserError(f"data root {root} does not exist; pass --data-root pointing at an "
                        f"ImageFolder tree or its .tar.gz")
    if stream:
        return _streamed(root, image_size, train_per_class, test_per_class)

    def build():
        ds = _read(root, image_size, train_per_class, test_per_class)
        return {"train_images": ds.train.images, "train_labels": ds.train.labels,
                "test_images": ds.test.images, "test_labels": ds.test.labels,
                "classes_json": _blob({"name": ds.name, "classes": ds.classes})}
    files = [root] if root.is_file() else sorted(root.rglob("*"))
    t = _cached(files, root, [image_size, train_per_class, test_per_class, 1], build)  # 1: the cache format
    meta = _meta(t)
    return Dataset(meta["name"], Split(t["train_images"], t["train_labels"]),
                   Split(t["test_images"], t["test_labels"]), meta["classes"])
