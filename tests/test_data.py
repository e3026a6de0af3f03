import ast
import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslprune.config import Data
import sslprune.data
from sslprune.data import cifar, load_dataset
from sslprune.data.augment import Normalize, batch_crop, batch_flip_lr
from sslprune.data.imagefolder import load_imagefolder
from sslprune.errors import UserError


def test_crop_is_a_shift_with_zero_fill_and_seeded():
    x = torch.randint(1, 255, (64, 3, 8, 8), dtype=torch.uint8)
    a = batch_crop(x, 2, torch.Generator().manual_seed(0))
    b = batch_crop(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):  # each output is one of the 25 windows of the padded image
        assert any(torch.equal(a[i], padded[i, :, dy:dy + 8, dx:dx + 8]) for dy in range(5) for dx in range(5))
    assert not torch.equal(a, x)


def test_flip_mirrors_about_half():
    x = torch.randint(0, 255, (400, 3, 4, 4), dtype=torch.uint8)
    y = batch_flip_lr(x, torch.Generator().manual_seed(0))
    same = (y == x).flatten(1).all(1)
    mirrored = (y == x.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert 150 < int(mirrored.sum()) < 250


def test_normalize_uses_given_stats():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = Normalize(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.5, 0.5, 0.5]))(x)
    assert torch.allclose(out, torch.ones_like(out)) and out.dtype == torch.float32


def test_digits_demo_dataset():
    ds = load_dataset(Data(dataset="digits"))
    assert ds.num_classes == 10 and ds.train.images.shape[1:] == (3, 8, 8)
    assert len(ds.train) + len(ds.test) == 1797
    sub = load_dataset(Data(dataset="digits", train_per_class=5, test_per_class=2))
    assert torch.bincount(sub.train.labels).tolist() == [5] * 10
    assert torch.bincount(sub.test.labels).tolist() == [2] * 10


def _write_tree(root, sizes=((8, 8),)):
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for c in ("cat", "Dog"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                w, h = sizes[i % len(sizes)]
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")


def test_imagefolder_folder_and_targz_agree_and_cache(tmp_path):
    _write_tree(tmp_path / "tree")
    a = load_imagefolder(tmp_path / "tree")
    assert a.classes == ["Dog", "cat"]  # sorted(): torchvision's order
    assert a.train.images.shape == (8, 3, 8, 8) and a.test.labels.tolist() == [0, 0, 1, 1]
    with tarfile.open(tmp_path / "tree.tar.gz", "w:gz") as t:
        t.add(tmp_path / "tree" / "train", "train")
        t.add(tmp_path / "tree" / "test", "test")
    b = load_imagefolder(tmp_path / "tree.tar.gz")
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    cached = list((tmp_path / "cache").glob("imagefolder-*.safetensors"))
    assert len(cached) == 2
    c = load_imagefolder(tmp_path / "tree.tar.gz")  # from the cache
    assert torch.equal(b.train.images, c.train.images) and c.classes == b.classes
    # a file changed inside the folder (the folder's own mtime does not move) is seen
    img = tmp_path / "tree" / "train" / "cat" / "0000.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(img)
    d = load_imagefolder(tmp_path / "tree")
    assert not torch.equal(d.train.images, a.train.images) and (d.train.images[4] == 0).all()


def test_imagefolder_resize_and_errors(tmp_path):
    _write_tree(tmp_path / "tree", sizes=((40, 20), (12, 30)))
    with pytest.raises(UserError, match="--image-size"):
        load_imagefolder(tmp_path / "tree")
    ds = load_imagefolder(tmp_path / "tree", image_size=16)
    assert ds.train.images.shape == (8, 3, 16, 16)
    with pytest.raises(UserError, match="does not exist"):
        load_imagefolder(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    with pytest.raises(UserError, match="not an ImageFolder tree"):
        load_imagefolder(tmp_path / "flat")
    (tmp_path / "tree" / "train" / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        load_imagefolder(tmp_path / "tree", image_size=16)
    (tmp_path / "bad.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(UserError, match="cannot read archive"):
        load_imagefolder(tmp_path / "bad.tar.gz")


def _fake_cifar_archive(path):
    """Official layout and pickle format, 10 images per batch."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name in cifar.FILES_MD5:
            blob = pickle.dumps({b"data": rng.integers(0, 255, (10, 3072), dtype=np.uint8),
                                 b"labels": list(range(10))})
            info = tarfile.TarInfo(f"{cifar.FOLDER}/{name}")
            info.size = len(blob)
            t.addfile(info, io.BytesIO(blob))
    path.write_bytes(buf.getvalue())
    members = {}
    with tarfile.open(path) as t:
        for m in t:
            members[m.name.split("/")[-1]] = hashlib.md5(t.extractfile(m).read()).hexdigest()
    return hashlib.md5(path.read_bytes()).hexdigest(), members


def test_cifar_download_with_md5_checks(tmp_path, monkeypatch):
    src = tmp_path / "src" / "cifar-10-python.tar.gz"
    src.parent.mkdir()
    archive_md5, files = _fake_cifar_archive(src)
    monkeypatch.setattr(cifar, "URL", src.as_uri())
    monkeypatch.setattr(cifar, "FILES_MD5", files)
    orig = cifar.download
    monkeypatch.setattr(cifar, "download", lambda root: orig(root, src.as_uri(), archive_md5))
    ds = cifar.load_cifar10(tmp_path / "data")
    assert ds.train.images.shape == (50, 3, 32, 32) and ds.test.images.shape == (10, 3, 32, 32)
    assert ds.classes[0] == "airplane" and ds.train.labels[:3].tolist() == [0, 1, 2]
    # a corrupted batch is detected, not reused: re-extracted from the verified archive...
    batch = tmp_path / "data" / cifar.FOLDER / "test_batch"
    with open(batch, "ab") as f:
        f.write(b"x")
    again = cifar.load_cifar10(tmp_path / "data")
    assert hashlib.md5(batch.read_bytes()).hexdigest() == files["test_batch"]
    assert torch.equal(again.test.images, ds.test.images)
    # ...or, with no archive left to extract from, an error
    (tmp_path / "data" / "cifar-10-python.tar.gz").unlink()
    with open(batch, "ab") as f:
        f.write(b"x")
    with pytest.raises(UserError, match="md5"):
        cifar.load_cifar10(tmp_path / "data")
    with pytest.raises(UserError, match="is a file"):
        cifar.load_cifar10(src)
    # a wrong archive checksum is refused
    monkeypatch.setattr(cifar, "download", lambda root: orig(root, src.as_uri(), "0" * 32))
    with pytest.raises(UserError, match="md5"):
        cifar.load_cifar10(tmp_path / "other")


def test_cifar_missing_without_network_names_files_and_url(tmp_path, monkeypatch):
    orig = cifar.download
    monkeypatch.setattr(cifar, "download", lambda root: orig(root, (tmp_path / "absent.tar.gz").as_uri()))
    with pytest.raises(UserError) as e:
        cifar.load_cifar10(tmp_path / "data")
    assert "data_batch_1" in str(e.value) and "download" in str(e.value)


def test_cifar_unpickler_builds_no_code(tmp_path):
    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned",))
    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        cifar._read_batch(p)


def test_data_modules_import_each_other_one_way():
    """No module of sslprune/data imports, even inside a function, one that imports it back."""
    folder = Path(sslprune.data.__file__).parent
    modules = {p.stem for p in folder.glob("*.py")}
    graph = {}
    for m in modules:
        deps = set()
        for node in ast.walk(ast.parse((folder / f"{m}.py").read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):  # relative to the package sslprune.data
                base = ".".join(["sslprune", "data"][:2 - node.level + 1] if node.level else [])
                name = ".".join(filter(None, [base, node.module]))
                names = [f"{name}.{a.name}" for a in node.names] if name == "sslprune.data" else [name]
            else:
                continue
            deps |= {n.split(".")[2] for n in names if n.startswith("sslprune.data.")}
        graph[m] = {d if d in modules else "__init__" for d in deps} - {m}

    def reaches(start, goal, seen=()):
        return any(d == goal or (d not in seen and reaches(d, goal, (*seen, d))) for d in graph[start])
    assert graph["tensors"] == set() and graph["images"] == set()  # the bottom layer
    assert not [m for m in modules if reaches(m, m)], graph
