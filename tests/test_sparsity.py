"""Natural sparsity and the random baseline adjusted for it."""
import csv

import torch

from sslprune import layout
from sslprune.cli import main
from sslprune.lottery import prepare, run_replicate
from sslprune.models import build_model
from sslprune.pruning import density, prunable
from sslprune.retrain import random_mask, retrain
from sslprune.sparsity import natural_sparsity

from .conftest import tiny_experiment


def test_natural_sparsity_of_planted_zeros_is_exact():
    torch.manual_seed(0)
    weights = {n: w.detach().clone() for n, w in prunable(build_model("convnet")).items()}
    eps = torch.finfo(torch.float32).eps
    first, last = list(weights)[0], list(weights)[-1]
    weights[first].view(-1)[:10] = 0.0              # exact zeros
    weights[first].view(-1)[10:15] = eps            # at the threshold: counted
    weights[first].view(-1)[15:20] = -eps / 2       # below, negative: counted
    weights[last].view(-1)[:7] = 2 * eps            # above: not counted
    weights[last].view(-1)[7:9] = 0.0
    s = natural_sparsity(weights)
    layers = {r["layer"]: r for r in s["layers"]}
    assert s["threshold"] == eps
    assert layers[first]["zeros"] == 20 and layers[last]["zeros"] == 2
    assert s["total"]["zeros"] == 22 and s["total"]["total"] == sum(w.numel() for w in weights.values())
    assert natural_sparsity(weights, threshold=3 * eps)["total"]["zeros"] == 29
    # A pruned network: weights the mask removed are zero by construction and are not counted.
    mask = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    mask[first].view(-1)[:15] = False                 # 15 of the 20 planted zeros were pruned
    mask[last].view(-1)[100:150] = False              # pruned, non-zero weights elsewhere
    masked = natural_sparsity(weights, mask=mask)
    assert masked["total"]["zeros"] == 7 and masked["total"]["total"] == s["total"]["total"] - 65


def _plant_zeros(exp_dir, fraction, seed=0):
    """Make `fraction` of level 0's trained prunable weights exactly zero; return their positions."""
    path = layout.level_dir(exp_dir, 1, 0) / "train" / layout.MODEL
    trained = layout.load_tensors(path)
    g = torch.Generator().manual_seed(seed)
    zeros = {}
    for n in prunable(build_model("convnet")):
        w = trained[f"backbone.{n}"]
        zeros[n] = torch.rand(w.shape, generator=g) < fraction
        w[zeros[n]] = 0.0
    layout.save_tensors(path, trained)
    done = layout.load_json(path.parent / layout.DONE)   # re-sealed: a deliberate edit, not damage
    layout.save_json(path.parent / layout.DONE, {**done, "files": {**done["files"], **layout.seal(path)["files"]}})
    return zeros


def test_adjusted_random_baseline_prunes_every_natural_zero_first(tmp_path, data):
    exp = tiny_experiment(epochs=1)
    exp_dir = prepare(exp, tmp_path, data, None, ["t"])
    run_replicate(exp, exp_dir, data, 1, 3, progress=False)
    zeros = _plant_zeros(exp_dir, 0.3)
    n_zeros = sum(int(z.sum()) for z in zeros.values())
    backbone = build_model("convnet")
    for level in (1, 2, 3):
        mask = random_mask(exp, exp_dir, backbone, 1, level, "random_adjusted")
        lottery = layout.load_tensors(layout.level_dir(exp_dir, 1, level) / layout.MASK)
        assert density(mask) == density(lottery)             # same count as the lottery's level
        pruned = sum(int((~m).sum()) for m in mask.values())
        if pruned <= n_zeros:                                 # level 1 (20%): only natural zeros go
            assert all(not (~mask[n] & ~zeros[n]).any() for n in mask)
        else:                                                 # later: every natural zero is gone
            assert all(not (mask[n] & zeros[n]).any() for n in mask)
        previous = random_mask(exp, exp_dir, backbone, 1, level - 1, "random_adjusted")
        assert all(not (mask[n] & ~previous[n]).any() for n in mask)    # nested: never revived
        plain = random_mask(exp, exp_dir, backbone, 1, level, "random")
        assert any((plain[n] & zeros[n]).any() for n in plain)  # the plain baseline keeps some
    res = retrain(exp, exp_dir, data, 1, 2, "random_adjusted", progress=False)
    assert 0 <= res["test_acc"] <= 1


def test_sparsity_command_writes_the_report(tmp_path, data, capsys):
    exp = tiny_experiment(epochs=1)
    exp_dir = prepare(exp, tmp_path / "runs", data, None, ["t"])
    run_replicate(exp, exp_dir, data, 1, 0, progress=False)
    _plant_zeros(exp_dir, 0.25)
    assert main(["sparsity", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")]) == 0
    rows = (tmp_path / "rep" / "natural_sparsity.csv").read_text().splitlines()
    total = [r for r in rows[1:] if r.split(",")[4] == "total"]
    assert len(total) == 1 and 0.2 < float(total[0].split(",")[-1]) < 0.3
    assert (tmp_path / "rep" / "natural_sparsity.png").stat().st_size > 0
    # --with-init: the initial weights' own fraction, the baseline a trained fraction is read against
    assert main(["sparsity", str(tmp_path / "runs"), "--threshold", "0.01", "--with-init", "--out",
                 str(tmp_path / "rep2")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "rep2" / "natural_sparsity.csv")))
    init = [r for r in rows if r["level"] == "init" and r["layer"] == "total"]
    start = layout.load_tensors(layout.replicate_dir(exp_dir, 1) / layout.INIT)
    weights = {k.removeprefix("backbone."): v for k, v in start.items() if k.removeprefix("backbone.") in
               {r["layer"] for r in rows if r["layer"] != "total"}}
    assert len(init) == 1 and float(init[0]["fraction"]) == natural_sparsity(weights, 0.01)["total"]["fraction"]
    assert "| init |" in (tmp_path / "rep2" / "natural_sparsity.md").read_text()
    assert main(["sparsity", str(tmp_path / "runs"), "--threshold", "-1"]) == 2
    assert "must be >= 0" in capsys.readouterr().err
