"""`sslprune eval probe`: per-level linear probes on the run's data and on another dataset."""
import csv
from pathlib import Path

import pytest
import torch
from PIL import Image

from sslprune import layout
from sslprune import probe as probe_mod
from sslprune.cli import main


def _imagefolder(root, sizes=((10, 12), (9, 9), (14, 8)), per_class=6):
    """A tiny ImageFolder tree of variable-size RGB images, 3 classes told apart by colour."""
    colours = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]
    for split in ("train", "test"):
        for c, colour in enumerate(colours):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", sizes[i % len(sizes)], tuple(v - 3 * i for v in colour)).save(d / f"{i}.png")
    return root


@pytest.fixture
def run_dir(tmp_path, capsys):
    assert main(["lottery", "--preset", "demo", "--task", "rotation", "--epochs", "1", "--levels", "1",
                 "--replicates", "1", "--root", str(tmp_path / "runs"), "--quiet"]) == 0
    return tmp_path / "runs" / capsys.readouterr().out.strip().splitlines()[-1].split("/")[-1]


def test_probe_every_level_on_own_and_downstream_data_then_report(tmp_path, run_dir, capsys, monkeypatch):
    assert main(["eval", "probe", str(run_dir)]) == 0
    folder = _imagefolder(tmp_path / "down")
    assert main(["eval", "probe", str(run_dir), "--dataset", "imagefolder", "--data-root", str(folder)]) == 0
    out = capsys.readouterr().out
    assert out.count("probe on digits") == 2 and out.count("probe on down") == 2
    for level in (0, 1):
        ldir = layout.level_dir(run_dir, 1, level)
        probes = sorted(p.name for p in ldir.glob("probe_*"))
        assert len(probes) == 2 and probes[0].startswith("probe_digits_") and probes[1].startswith("probe_down_")
        down = layout.load_json(ldir / probes[1] / layout.DONE)
        assert down["n_train"] == 18 and down["classes"] == 3 and 0 <= down["test_mean_class_acc"] <= 1
        assert (ldir / probes[0] / "features.safetensors").exists()
    # Idempotent: finished probes are read back, never refitted.
    monkeypatch.setattr(probe_mod, "fit_probe", lambda *a, **k: pytest.fail("refitted"))
    assert main(["eval", "probe", str(run_dir)]) == 0
    monkeypatch.undo()
    assert main(["report", str(run_dir), "--out", str(tmp_path / "rep")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "rep" / "results.csv")))
    evals = {r["eval"] for r in rows}
    down = [e for e in evals if e.startswith("probe down [")]
    assert len(down) == 1 and any(e.startswith("probe digits [") for e in evals)
    assert {r["level"] for r in rows if r["eval"] == down[0]} == {"0", "1"}
    md = (tmp_path / "rep" / "summary.md").read_text()
    assert f"Linear {down[0]}: mean per-class test accuracy" in md
    # The same dataset read another way is another probe, never pooled with the first as replicates.
    assert main(["eval", "probe", str(run_dir), "--dataset", "imagefolder", "--data-root", str(folder),
                 "--train-per-class", "5"]) == 0
    assert main(["report", str(run_dir), "--out", str(tmp_path / "rep")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "rep" / "results.csv")))
    assert len({r["eval"] for r in rows if r["eval"].startswith("probe down [")}) == 2


def test_probe_of_an_intermediate_stage(tmp_path, run_dir, capsys):
    assert main(["eval", "probe", str(run_dir), "--stage", "features.5", "--level", "0"]) == 0
    assert "probe on digits @features.5" in capsys.readouterr().out
    ldir = layout.level_dir(run_dir, 1, 0)
    (probe,) = ldir.glob("probe_digits@features.5_*")
    f = layout.load_tensors(probe / "features.safetensors")
    assert f["train"].shape[1] == 64                     # the convnet's second block: 64 channels
    assert main(["report", str(run_dir), "--out", str(tmp_path / "rep")]) == 0
    assert "probe digits @features.5 [" in (tmp_path / "rep" / "results.csv").read_text()
    assert main(["eval", "probe", str(run_dir), "--stage", "layer9"]) == 2
    assert "no module of this backbone" in capsys.readouterr().err


def test_probe_errors_are_one_line(tmp_path, run_dir, capsys):
    assert main(["eval", "probe", str(run_dir), "--level", "7"]) == 2
    assert "has no trained level 7" in capsys.readouterr().err
    assert main(["eval", "probe", str(run_dir), "--dataset", "imagefolder", "--data-root", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    folder = _imagefolder(tmp_path / "down")
    assert main(["eval", "probe", str(run_dir), "--dataset", "imagefolder", "--data-root", str(folder),
                 "--train-per-class", "1"]) == 2
    assert "too few" in capsys.readouterr().err


def test_finetune_keeps_pruned_weights_at_zero_and_is_reported(tmp_path, run_dir, capsys):
    folder = _imagefolder(tmp_path / "down")
    assert main(["eval", "finetune", str(run_dir), "--dataset", "imagefolder", "--data-root", str(folder),
                 "--epochs", "2", "--batch-size", "6", "--quiet"]) == 0
    assert capsys.readouterr().out.count("fine-tuned on down") == 2
    for level in (0, 1):
        ldir = layout.level_dir(run_dir, 1, level)
        (ft,) = ldir.glob("finetune_down_*")
        weights, mask = layout.load_tensors(ft / layout.MODEL), layout.load_tensors(ldir / layout.MASK)
        assert weights["task.head.weight"].shape[0] == 3                 # the target's classes
        trained = layout.load_tensors(ldir / "train" / layout.MODEL)
        for n, m in mask.items():
            assert (weights[f"backbone.{n}"][~m] == 0).all()              # pruned stays pruned
        assert any(not torch.equal(weights[k], trained[k]) for k in trained if k.startswith("backbone."))
    assert main(["report", str(run_dir), "--out", str(tmp_path / "rep")]) == 0
    summary = (tmp_path / "rep" / "summary.md").read_text()
    assert "Transfer to down: pruned then fine-tuned (mask fixed)" in summary and "| rotation / finetune [" in summary


def test_finetune_starts_from_the_levels_trained_weights(tmp_path, run_dir, monkeypatch):
    from sslprune import transfer
    seen = {}

    def fake_train(backbone, task, data, cfg, aug, mask, out, **k):
        seen.update({f"backbone.{n}": v.clone() for n, v in backbone.state_dict().items()})
        return {"test_acc": 0.0, "test_mean_class_acc": 0.0}

    monkeypatch.setattr(transfer, "train", fake_train)
    folder = _imagefolder(tmp_path / "down")
    assert main(["eval", "finetune", str(run_dir), "--dataset", "imagefolder", "--data-root", str(folder),
                 "--level", "1", "--quiet"]) == 0
    trained = layout.load_tensors(layout.level_dir(run_dir, 1, 1) / "train" / layout.MODEL)
    assert seen and all(torch.equal(seen[k], trained[k]) for k in seen)


def test_pruning_during_transfer_reaches_the_requested_densities(tmp_path, run_dir, capsys):
    """Arm 2: a lottery on the target data, each replicate started from the same replicate's dense
    level-0 weights of the source run; the report sets it beside arm 1 (fine-tuning)."""
    folder = _imagefolder(tmp_path / "down", per_class=8)
    argv = ["lottery", "--preset", "demo", "--task", "labels", "--dataset", "imagefolder", "--data-root",
            str(folder), "--image-size", "8", "--pretrained", str(run_dir), "--rewind", "0it", "--epochs", "1",
            "--batch-size", "6", "--levels", "3", "--replicates", "1", "--root", str(tmp_path / "t"), "--quiet"]
    assert main(argv) == 0
    target = Path(capsys.readouterr().out.strip().splitlines()[-1])
    from sslprune.pruning import density
    for level in range(4):
        assert abs(density(layout.load_tensors(layout.level_dir(target, 1, level) / layout.MASK)) - 0.8 ** level) < 1e-4
    init = layout.load_tensors(layout.replicate_dir(target, 1) / layout.INIT)
    src = layout.load_tensors(layout.level_dir(run_dir, 1, 0) / "train" / layout.MODEL)
    assert all(torch.equal(init[k], src[k]) for k in src if k.startswith("backbone."))
    # a replicate the source does not have is refused, in one line
    assert main([*argv, "--replicates", "2", "--root", str(tmp_path / "t2")]) == 2
    assert "level 0 of replicate 2 is not trained there" in capsys.readouterr().err
    assert not (tmp_path / "t2").exists()
    assert main(["eval", "finetune", str(run_dir), "--dataset", "imagefolder", "--data-root", str(folder),
                 "--image-size", "8", "--epochs", "1", "--level", "0-1", "--replicates", "1", "--quiet"]) == 0
    assert main(["report", str(run_dir), str(target), "--out", str(tmp_path / "rep")]) == 0
    from sslprune.report import collect
    rows = [r for r in collect([run_dir, target]) if r["eval"] == "transfer down" and r["metric"] == "test_acc"]
    arms = {(r["objective"], r["reset"].split(" [")[0], r["level"]) for r in rows}
    assert arms == {("rotation", "finetune", 0), ("rotation", "finetune", 1),
                    *{("rotation", "pruned during transfer", lv) for lv in range(4)}}
    table = (tmp_path / "rep" / "summary.md").read_text().split("## Transfer to down")[1]
    header = table.splitlines()[2]
    assert "rotation / finetune [" in header and "rotation / pruned during transfer" in header
    # the source's level 0 re-trained since: the arms would no longer be paired, so it is refused
    model = layout.level_dir(run_dir, 1, 0) / "train" / layout.MODEL
    w = layout.load_tensors(model)
    layout.save_tensors(model, {k: v + 1 if v.is_floating_point() else v for k, v in w.items()})
    assert main([*argv[:-7], "--levels", "4", *argv[-5:]]) == 2
    assert "changed since replicate 1" in capsys.readouterr().err


def test_a_stage_followed_by_an_in_place_op_gives_its_own_output():
    """features.4 is a batch-norm whose output the next ReLU(inplace=True) overwrites: the probe reads
    the batch-norm's output (negative values included), not the ReLU's."""
    from sslprune.data.augment import Normalize
    from sslprune.models import build_model
    torch.manual_seed(0)
    backbone = build_model("convnet").eval()
    images = torch.randint(0, 255, (8, 3, 8, 8), dtype=torch.uint8)
    normalize = Normalize(torch.full((3,), 120.0), torch.full((3,), 60.0))
    got = probe_mod.features(backbone, images, normalize, stage="features.4")
    seen = []
    backbone.features[4].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone().mean((2, 3))))
    with torch.no_grad():
        backbone(normalize(images))
    assert got.min() < 0 and torch.allclose(torch.from_numpy(got), seen[0], atol=1e-6)


def test_the_probe_never_looks_at_the_test_split_to_choose_its_regularisation():
    """C and its validation accuracy come from the training split alone: test labels permuted or test
    features replaced change neither. Mean per-class accuracy weighs an unbalanced test split's
    classes equally (30 / 28 / 2 images)."""
    import numpy as np
    rng = np.random.default_rng(0)
    train_y = np.repeat(np.arange(3), 40)
    train_x = rng.normal(size=(120, 6)) + train_y[:, None] * 0.8
    test_y = np.repeat(np.arange(3), (30, 28, 2))
    test_x = rng.normal(size=(60, 6)) + test_y[:, None] * 0.8
    res = probe_mod.fit_probe(train_x, train_y, test_x, test_y)
    for other_x, other_y in ((test_x, rng.permutation(test_y)), (rng.normal(size=(60, 6)), test_y)):
        again = probe_mod.fit_probe(train_x, train_y, other_x, other_y)
        assert (again["C"], again["val_acc"]) == (res["C"], res["val_acc"])
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    pred = make_pipeline(StandardScaler(), LogisticRegression(C=res["C"], max_iter=1000)).fit(train_x, train_y).predict(test_x)
    per_class = [(pred[test_y == k] == k).mean() for k in range(3)]
    assert res["mean_class_acc"] == pytest.approx(sum(per_class) / 3)
    assert res["acc"] == pytest.approx((pred == test_y).mean())
