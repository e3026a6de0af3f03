"""eval stability: linear-mode-connectivity instability (Frankle et al. 2020) of a level's ticket."""
import csv

import pytest
import torch

from sslprune import layout
from sslprune.data.augment import Normalize
from sslprune.errors import UserError
from sslprune.lottery import build, prepare, run_replicate
from sslprune.stability import instability, interpolate, level_stability, path_metrics, recompute_batchnorm
from sslprune.train import draw_images, weights

from .conftest import digits_lottery, tiny_experiment


def test_two_identical_copies_have_zero_instability(data):
    exp = tiny_experiment(task="rotation")
    backbone, task = build(exp, data, seed=3)
    state = {k: v.clone() for k, v in weights(backbone, task).items()}
    normalize = Normalize(*data.channel_stats())
    metrics = path_metrics(backbone, task, state, state, data, normalize, [i / 4 for i in range(5)], 32,
                           aug=exp.data)
    assert len(set(metrics)) == 1 and instability(metrics) == 0.0


def test_interpolation_keeps_pruned_weights_at_zero_and_ends_exact():
    a = {"w": torch.tensor([0.0, 1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([0.0, -1.0, 4.0]), "n": torch.tensor(5)}
    assert torch.equal(interpolate(a, b, 0.0)["w"], a["w"]) and torch.equal(interpolate(a, b, 1.0)["w"], b["w"])
    mid = interpolate(a, b, 0.5)
    assert torch.equal(mid["w"], torch.tensor([0.0, 0.0, 3.0])) and mid["n"] == 3
    assert instability([0.9, 0.5, 0.8]) == pytest.approx(0.5 - 0.15)   # error 0.5 on the path, ends 0.1 and 0.2


def test_recomputed_batchnorm_is_the_exact_average_in_train_mode(data):
    exp = tiny_experiment(task="labels")
    backbone, task = build(exp, data, seed=0)
    normalize = Normalize(*data.channel_stats())
    bank = {k: v.clone() for k, v in task.state_dict().items()}
    recompute_batchnorm(backbone, task, data.train.images, data.train.labels, normalize, 32, batches=100)
    # every training image once (no augmentation): the first BN's mean is the conv output's mean
    with torch.no_grad():
        out = backbone.features[0](normalize(data.train.images))          # (N, 32, H, W)
    torch.testing.assert_close(backbone.features[1].running_mean, out.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert not backbone.training and backbone.features[1].momentum == 0.1   # left in eval mode, momentum back
    assert all(torch.equal(v, task.state_dict()[k]) for k, v in bank.items() if "running" not in k)


def test_recomputed_batchnorm_sees_the_training_augmentation(data):
    """Statistics from batches cropped and flipped as training draws them (fixed seed), not from the
    images as they are: those leave a trained network's ends below its accuracy as trained."""
    exp = tiny_experiment(task="labels", crop_pad=2, flip=True)
    backbone, task = build(exp, data, seed=0)
    normalize = Normalize(*data.channel_stats())
    images, batches, size = data.train.images, 2, 32
    recompute_batchnorm(backbone, task, images, data.train.labels, normalize, size, batches, exp.data)
    generator = torch.Generator().manual_seed(0)          # the draws recompute_batchnorm makes
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    seen = torch.cat([draw_images(images, order[i * size:(i + 1) * size], exp.data, generator) for i in range(batches)])
    with torch.no_grad():
        out = backbone.features[0](normalize(seen))                       # (2 * 32, 32, H, W)
        plain = backbone.features[0](normalize(images[order[:batches * size]]))
    torch.testing.assert_close(backbone.features[1].running_mean, out.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out.mean((0, 2, 3)), plain.mean((0, 2, 3)), rtol=1e-3, atol=1e-4)   # it tells them apart


def test_level_stability_end_to_end_ends_reproduce_the_trained_networks(tmp_path, data, monkeypatch):
    import sslprune.stability as stability_mod
    exp = tiny_experiment(task="rotation", epochs=2, rewind="1it")
    exp_dir = prepare(exp, tmp_path, data, None, ["t"])
    run_replicate(exp, exp_dir, data, 1, 1, progress=False)
    starts, real_train, finished, paths, real_path = {}, stability_mod.train, {}, [], stability_mod.path_metrics

    def spy(backbone, task, data, cfg, aug, mask, out, seed, **k):  # where each copy really starts
        starts[str(out.relative_to(exp_dir))] = ({n: v.clone() for n, v in weights(backbone, task).items()}, mask, seed)
        finished[str(out.relative_to(exp_dir))] = layout.is_done(out)   # read back, or trained now
        return real_train(backbone, task, data, cfg, aug, mask, out, seed=seed, **k)

    def path_spy(*args, aug, **k):  # the augmentation the batch-norm statistics are recomputed under
        paths.append(aug)
        return real_path(*args, aug=aug, **k)

    monkeypatch.setattr(stability_mod, "train", spy)
    monkeypatch.setattr(stability_mod, "path_metrics", path_spy)
    kept = level_stability(exp, exp_dir, data, 1, 1, points=5, bn="keep", progress=False)
    # copy 2 starts from the ticket (the rewind point, head and batch-norm included; train() applies the
    # level's mask), with another seed than copy 1, the level's own run
    rewind = layout.load_tensors(layout.replicate_dir(exp_dir, 1) / layout.REWIND)
    start, given, seed = starts["replicate_1/level_1/stability/copy_2"]
    mask = layout.load_mask(layout.level_dir(exp_dir, 1, 1) / layout.MASK)
    assert start.keys() == rewind.keys() and all(torch.equal(start[n], rewind[n]) for n in rewind)
    assert given.keys() == mask.keys() and all(torch.equal(given[n], mask[n]) for n in mask)
    assert kept["seeds"][0] == 1 and seed == kept["seeds"][1] != 1
    # bn keep: the ends are exactly the two trained networks, so their accuracies are the runs' own
    assert kept["test_acc"][0] == kept["ends_trained_acc"][0] and kept["test_acc"][-1] == kept["ends_trained_acc"][1]
    assert kept["copies"][0] == "replicate_1/level_1/train"                # level 1 started at the rewind point
    assert kept["ends_trained_acc"][0] == layout.load_json(
        layout.level_dir(exp_dir, 1, 1) / "train" / layout.DONE)["test_acc"]
    second = layout.load_model(layout.stability_dir(layout.level_dir(exp_dir, 1, 1)) / "copy_2")
    first = layout.load_model(layout.level_dir(exp_dir, 1, 1) / "train")
    assert any(not torch.equal(second[k], first[k]) for k in first)        # another data order: another network
    assert all(torch.all(second[f"backbone.{n}"][~m] == 0) for n, m in mask.items())
    # idempotent: the result is read back, nothing retrained; other options are refused, not served it
    assert level_stability(exp, exp_dir, data, 1, 1, points=5, bn="keep", progress=False) == kept
    for other in ({"points": 3, "bn": "keep"}, {"points": 5, "bn": "recompute"}):
        with pytest.raises(UserError, match="was measured with --points 5 --bn keep; ask for those"):
            level_stability(exp, exp_dir, data, 1, 1, progress=False, **other)
    # a copy retrained since (another model under its done.json): the path is not served again
    copy2 = layout.stability_dir(layout.level_dir(exp_dir, 1, 1)) / "copy_2"
    done = layout.load_json(copy2 / layout.DONE)
    layout.save_json(copy2 / layout.DONE, {**done, "files": {layout.MODEL: {"sha256": "0" * 64, "size": 1}}})
    with pytest.raises(UserError, match="measured between other networks than .*copy_2 holds now"):
        level_stability(exp, exp_dir, data, 1, 1, points=5, bn="keep", progress=False)
    layout.save_json(copy2 / layout.DONE, done)
    # level 0 with a rewind point after the init trains both copies from it (the dense run started at the init)
    dense = level_stability(exp, exp_dir, data, 1, 0, points=3, bn="recompute", progress=False)
    assert dense["copies"] == ["replicate_1/level_0/stability/copy_1", "replicate_1/level_0/stability/copy_2"]
    assert all(abs(m - t) < 0.15 for m, t in zip(dense["test_acc"][::2], dense["ends_trained_acc"]))
    assert dense["bn_augmentation"] == {"crop_pad": 1, "flip": True} and paths[-1] == exp.data   # the run's own
    # a path measured by an earlier sslprune (statistics from unaugmented images, nothing recorded) is
    # refused; deleting its done.json measures the path again from the same copies, none retrained
    out = layout.stability_dir(layout.level_dir(exp_dir, 1, 0))
    old = {k: v for k, v in dense.items() if k != "bn_augmentation"}
    layout.save_json(out / layout.DONE, old)
    for points in (3, 5):   # other options too: no options of today measure it as it was, so only the delete
        with pytest.raises(UserError, match=r"under other augmentation than this run's .*delete .*done.json"):
            level_stability(exp, exp_dir, data, 1, 0, points=points, bn="recompute", progress=False)
    (out / layout.DONE).unlink()
    finished.clear()
    again = level_stability(exp, exp_dir, data, 1, 0, points=3, bn="recompute", progress=False)
    assert finished == {"replicate_1/level_0/stability/copy_1": True, "replicate_1/level_0/stability/copy_2": True}
    assert again == dense and again["copies_sealed"] == dense["copies_sealed"]   # the same copies, read back


def test_eval_stability_cli_refuses_bad_options_before_training(tmp_path, capsys):
    from sslprune.cli import main
    exp_dir = digits_lottery(tmp_path / "runs")
    capsys.readouterr()
    assert main(["eval", "stability", str(exp_dir), "--points", "2", "--quiet"]) == 2
    assert "--points must be at least 3" in capsys.readouterr().err
    assert not (exp_dir / "replicate_1/level_0/stability").exists()


def test_report_plots_instability_against_the_rewind_point(tmp_path, data):
    from sslprune.report import collect, write_report
    from sslprune.retrain import retrain

    dirs = []
    for rewind in ("0it", "2it"):
        exp = tiny_experiment(task="rotation", epochs=1, rewind=rewind)
        exp_dir = prepare(exp, tmp_path / "runs", data, None, ["t"])
        run_replicate(exp, exp_dir, data, 1, 1, progress=False)
        level_stability(exp, exp_dir, data, 1, 1, points=3, progress=False)
        retrain(exp, exp_dir, data, 1, 1, "rewind", progress=False)
        dirs.append(exp_dir)
    paths = write_report(dirs, tmp_path / "report")
    lines = paths["stability_csv"].read_text().splitlines()
    assert len(lines) == 3 and all(",rotation,1,1," in line for line in lines[1:])   # one curve, two rewind points
    assert all(row["points"] == "3" for row in csv.DictReader(lines))   # the path's resolution, said
    assert all(row["batchnorm"] == "recompute, 20 batches, crop 1 + flip" for row in csv.DictReader(lines))
    assert paths["stability_png"].exists() and paths["stability_png"].with_suffix(".svg").exists()
    assert "rewind (epochs)" in paths["md"].read_text()
    # elsewhere the two experiments are two curves, told apart by their rewind point, never averaged
    assert {r["objective"] for r in collect(dirs)} == {"rotation (rewind 0it)", "rotation (rewind 2it)"}


def test_npid_bank_is_rebuilt_for_the_network_on_the_path(data):
    exp = tiny_experiment(task="npid", knn=20)
    backbone, task = build(exp, data, seed=0)
    normalize = Normalize(*data.channel_stats())
    task.rebuild_state(backbone.eval(), data.train.images, normalize)
    with torch.no_grad():
        want = task.embed(backbone, data.train.images, normalize)
    torch.testing.assert_close(task.bank, want)


def test_bad_stability_options_record_nothing(tmp_path, capsys):
    from sslprune.cli import main
    exp_dir = digits_lottery(tmp_path / "runs")
    before = (exp_dir / layout.CONFIG).read_bytes()
    assert main(["eval", "stability", str(exp_dir), "--bn-batches", "0", "--quiet"]) == 2
    assert "--bn-batches must be at least 1" in capsys.readouterr().err
    assert (exp_dir / layout.CONFIG).read_bytes() == before
