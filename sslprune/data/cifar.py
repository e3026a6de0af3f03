"""CIFAR-10 in its official python format (Krizhevsky 2009), downloaded with md5 checks when absent.

The batches are Python pickles. We read them with an unpickler that can build nothing but numpy
arrays, lists, dicts and bytes, so a tampered file cannot run code.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..layout import file_lock
from .tensors import Dataset, Split

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
FILES_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


class _SafeUnpickler(pickle.Unpickler):
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        d = _SafeUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)  # stored as (N, 3*32*32), RGB planes
    y = np.asarray(d[b"labels"], dtype=np.int64)
    return x, y


def download(root: Path, url: str = URL, archive_md5: str = ARCHIVE_MD5) -> None:
    """Fetch the official archive into root, check its md5, extract it. One process at a time (the
    ranks of a torchrun job or the workers of a sweep may all find the data missing at once)."""
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / ".download.lock"):
        if _complete(root / FOLDER):   # another process finished it while this one waited
            return
        _download(root, url, archive_md5)


def _download(root: Path, url: str, archive_md5: str) -> None:
    archive = root / Path(url).name
    if not archive.exists() or md5(archive) != archive_md5:
        tmp = archive.with_suffix(".part")
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise UserError(f"CIFAR-10 not found in {root / FOLDER} (expected {', '.join(FILES_MD5)}) "
                            f"and downloading {url} failed ({e}); download it by hand into {root}, "
                            f"or pass --dataset imagefolder --data-root DIR") from None
        got = md5(tmp)
        if got != archive_md5:
            tmp.unlink()
            raise UserError(f"downloaded {url} has md5 {got}, expected {archive_md5}; "
                            f"the download is corrupt, try again")
        tmp.replace(archive)
    # Extract beside, then rename: a kill mid-way leaves no half-written batches behind.
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    try:
        with tarfile.open(archive, "r:gz") as t:
            t.extractall(tmp, filter="data")
        if (root / FOLDER).exists():
            shutil.rmtree(root / FOLDER)  # incomplete (files missing or failing md5): replaced whole
        (tmp / FOLDER).rename(root / FOLDER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _complete(folder: Path) -> bool:
    """Every batch file there with its published md5."""
    return all((folder / n).exists() and md5(folder / n) == want for n, want in FILES_MD5.items())


def load_cifar10(root, download_ok: bool = True, **_) -> Dataset:
    root = Path(root or "data")
    if root.exists() and not root.is_dir():
        raise UserError(f"--data-root {root} is a file; cifar10 needs a folder (holding {FOLDER}); "
                        f"for an ImageFolder .tar.gz use --dataset imagefolder")
    folder = root / FOLDER
    missing = [n for n in FILES_MD5 if not (folder / n).exists()]
    if missing and download_ok:
        download(root)
    missing = [n for n in FILES_MD5 if not (folder / n).exists()]
    if missing:
        raise UserError(f"CIFAR-10 files {missing} missing from {folder}; get {URL} and extract "
                        f"it into {root}")
    bad = [n for n, want in FILES_MD5.items() if md5(folder / n) != want]
    if bad and download_ok and (root / Path(URL).name).exists():
        download(root)  # the verified archive is still there: extract it again
        bad = [n for n, want in FILES_MD5.items() if md5(folder / n) != want]
    if bad:
        raise UserError(f"{folder / bad[0]} fails its md5 check (expected {FILES_MD5[bad[0]]}); "
                        f"delete {folder} and run again to re-download it")
    train = [_read_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    xt, yt = _read_batch(folder / "test_batch")
    x = np.concatenate([b[0] for b in train])
    y = np.concatenate([b[1] for b in train])
    return Dataset("cifar10", Split(torch.from_numpy(x), torch.from_numpy(y)),
                   Split(torch.from_numpy(xt), torch.from_numpy(yt)), list(CLASSES))
