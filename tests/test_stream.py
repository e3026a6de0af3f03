"""--stream: an ImageFolder's training split decoded from disk by DataLoader workers."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sslprune import layout
from sslprune.config import Data
from sslprune.data import load_dataset
from sslprune.data.stream import Crops, ImageFiles, resized_crop_box
from sslprune.lottery import build
from sslprune.pruning import dense_mask
from sslprune.train import train

from .conftest import killed_at_evaluation, tiny_experiment


def write_tree(root, per_class=(8, 3), classes=("ant", "bee", "cat"), seed=0):
    """Images of varying size and aspect (JPEG and PNG), a class = which half is bright."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(18, 40, 2))
                a = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
                a[:, : w // 2] += 100 * (c % 2)
                Image.fromarray(a).save(root / split / name / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture
def tree(tmp_path):
    return write_tree(tmp_path / "tree")


def test_resized_crop_boxes_follow_torchvision_semantics():
    rng = np.random.default_rng(0)
    areas, aspects = [], []
    for _ in range(2000):
        left, top, w, h = resized_crop_box(64, 48, rng)
        assert 0 <= left and left + w <= 64 and 0 <= top and top + h <= 48
        areas.append(w * h / (64 * 48))
        aspects.append(w / h)
    # rounding to whole pixels moves the bounds a little
    assert 0.07 <= min(areas) and max(areas) <= 1.0 and min(areas) < 0.15 and max(areas) > 0.9
    assert 0.7 <= min(aspects) and max(aspects) <= 1.4
    assert abs(np.median(np.log(aspects))) < 0.05                  # log-uniform aspect: centred on 1
    # no crop of 8-100% of the area with aspect 3/4-4/3 fits a 100x4 strip: its largest central
    # crop with aspect 4/3 (the torchvision fallback)
    assert resized_crop_box(100, 4, rng) == (47, 0, 5, 4)
    assert resized_crop_box(10, 10, np.random.default_rng(1)) == resized_crop_box(10, 10, np.random.default_rng(1))


def test_crops_are_keyed_by_seed_epoch_and_position_and_flip_half(tmp_path):
    a = np.zeros((20, 20, 3), dtype=np.uint8)
    a[:, 10:] = 255                                               # dark left half, bright right half
    (tmp_path / "x").mkdir()
    Image.fromarray(a).save(tmp_path / "x" / "0.png")
    files = ImageFiles(tmp_path, ["x/0.png"], torch.tensor([0]), 8)
    crops = Crops(files, flip=True, seed=3)
    x = crops[(0, 1, 5)]
    assert x.shape == (3, 8, 8) and x.dtype == torch.uint8
    assert torch.equal(x, Crops(files, flip=True, seed=3)[(0, 1, 5)])         # a key is one crop
    flipped = sum(float(crops[(0, 0, p)][:, :, 0].float().mean()) > float(crops[(0, 0, p)][:, :, -1].float().mean())
                  for p in range(400))
    assert 160 < flipped < 240                                    # the bright half moves left half the time
    unflipped = Crops(files, flip=False, seed=3)
    assert all(unflipped[(0, 0, p)][:, :, 0].float().mean() <= unflipped[(0, 0, p)][:, :, -1].float().mean()
               for p in range(50))


def test_a_streamed_imagefolder_keeps_order_labels_and_an_in_memory_test_split(tree):
    ds = load_dataset(Data(dataset="imagefolder", image_size=16, stream=True, train_per_class=5), tree)
    assert isinstance(ds.train, ImageFiles) and len(ds.train) == 15 and ds.train.image_shape == (3, 16, 16)
    assert ds.train.files[:2] == ["train/ant/000.jpg", "train/ant/001.png"] and ds.train.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert ds.test.images.shape == (9, 3, 16, 16) and ds.classes == ["ant", "bee", "cat"]
    mean, std = ds.channel_stats()
    assert mean.shape == (3,) and 0.1 < float(mean[0]) < 0.6 and float(std.min()) > 0.05
    again = load_dataset(Data(dataset="imagefolder", image_size=16, stream=True, train_per_class=5), tree)
    before = ds.fingerprint()
    assert again.fingerprint() == before
    (tree / "train" / "ant" / "000.jpg").write_bytes((tree / "train" / "ant" / "000.jpg").read_bytes() + b"x")
    changed = load_dataset(Data(dataset="imagefolder", image_size=16, stream=True, train_per_class=5), tree)
    assert changed.fingerprint() != before               # a changed file is another dataset


def _run(tree, out, seed=0, **runtime):
    from sslprune.runtime import Runtime
    exp = tiny_experiment(task="rotation", dataset="imagefolder", stream=True, image_size=16, crop_pad=0,
                          epochs=3, batch_size=8, optimizer="sgd", lr=0.05)
    data = load_dataset(exp.data, tree)
    backbone, task = build(exp, data, seed=0)
    train(backbone, task, data, exp.train, exp.data, dense_mask(backbone), out, seed=seed,
          runtime=Runtime("cpu", **runtime), progress=False)
    return layout.load_tensors(out / layout.MODEL)


def test_streamed_training_is_the_same_with_any_number_of_workers_and_after_a_kill(tree, tmp_path, monkeypatch):
    a = _run(tree, tmp_path / "a", loader_workers=0)
    b = _run(tree, tmp_path / "b", loader_workers=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    killed_at_evaluation(monkeypatch, 2, lambda: _run(tree, tmp_path / "c", loader_workers=1))
    c = _run(tree, tmp_path / "c", loader_workers=1)
    assert all(torch.equal(a[k], c[k]) for k in a)
    other = _run(tree, tmp_path / "d", seed=1, loader_workers=0)   # another seed draws other crops
    assert any(not torch.equal(a[k], other[k]) for k in a if a[k].is_floating_point())


def test_a_broken_image_stops_a_streamed_run_with_one_line(tree, tmp_path):
    (tree / "train" / "bee" / "002.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(Exception) as e:
        _run(tree, tmp_path / "a", loader_workers=1)
    assert type(e.value).__name__ == "UserError" and "cannot decode image" in str(e.value)
    assert "\n" not in str(e.value) and "002.jpg" in str(e.value)


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "cifar10"], "--stream reads an ImageFolder from disk"),
    (["--image-size", "16", "--crop-pad", "2"], "--crop-pad does not apply with --stream"),
    ([], "pass --image-size N"),
    (["--image-size", "16", "--tar"], "a .tar.gz cannot serve"),
])
def test_stream_misuse_is_one_line_and_exit_2(tree, tmp_path, flags, message):
    import tarfile
    root = str(tree)
    if "--tar" in flags:
        flags = [f for f in flags if f != "--tar"]
        root = str(tmp_path / "tree.tar.gz")
        with tarfile.open(root, "w:gz") as t:
            t.add(tree, arcname="tree")
    r = subprocess.run([sys.executable, "-m", "sslprune", "lottery", "--dataset", "imagefolder", "--data-root", root,
                        "--stream", "--model", "convnet", "--task", "rotation", "--epochs", "1", "--batch-size", "8",
                        "--lr", "0.1", "--levels", "0", "--root", str(tmp_path / "runs"), *flags],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert not (tmp_path / "runs").exists()


def test_a_probe_refuses_streamed_training_data(tree):
    from sslprune.data.augment import Normalize
    from sslprune.errors import UserError
    from sslprune.probe import probe_level
    ds = load_dataset(Data(dataset="imagefolder", image_size=16, stream=True), tree)
    with pytest.raises(UserError, match="streamed from disk"):
        probe_level(tree, 1, 0, ds, Normalize(torch.zeros(3), torch.ones(3)))
    assert math.isfinite(float(ds.channel_stats()[0].sum()))
