import json

import pytest
import torch

from sslprune import layout
from sslprune import train as train_mod
from sslprune.errors import UserError
from sslprune.lottery import prepare, run_replicate
from sslprune.pruning import density
from sslprune.retrain import retrain

from .conftest import killed_at_evaluation, tiny_experiment


def _all_files(d):
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*.safetensors"))}


def test_levels_masks_and_rewind(tmp_path, data, monkeypatch):
    exp = tiny_experiment(task="rotation")
    exp_dir = prepare(exp, tmp_path, data, None, ["test"])
    starts = []
    real_enforcer = train_mod.MaskEnforcer

    def spy(backbone, mask):  # built once per training run, just before the first step
        starts.append({n: v.clone() for n, v in backbone.state_dict().items()})
        return real_enforcer(backbone, mask)

    monkeypatch.setattr(train_mod, "MaskEnforcer", spy)
    run_replicate(exp, exp_dir, data, 1, 3, progress=False)
    assert len(starts) == 4
    rewind = layout.load_tensors(layout.replicate_dir(exp_dir, 1) / layout.REWIND)
    prev = None
    for level in range(4):
        ldir = layout.level_dir(exp_dir, 1, level)
        mask = layout.load_tensors(ldir / layout.MASK)
        total = sum(m.numel() for m in mask.values())
        assert abs(density(mask) - 0.8 ** level) <= len(mask) / total   # one weight per layer
        if prev is not None:
            assert all(not (mask[n] & ~prev[n]).any() for n in mask)  # nested
        prev = mask
        if level:
            start = starts[level]
            for n in mask:  # winning ticket: the rewind point under the mask
                assert torch.equal(start[n], rewind[f"backbone.{n}"] * mask[n])
            bn = "features.1.running_mean"
            assert torch.equal(start[bn], rewind[f"backbone.{bn}"])  # batch-norm rewound, not re-initialised
        done = layout.load_json(ldir / "train" / layout.DONE)
        assert 0 <= done["test_acc"] <= 1


def test_resume_at_any_point_equals_uninterrupted(tmp_path, data, monkeypatch):
    exp = tiny_experiment()
    straight = prepare(exp, tmp_path / "a", data, None, ["t"])
    run_replicate(exp, straight, data, 1, 2, progress=False)
    killed = prepare(exp, tmp_path / "b", data, None, ["t"])
    # evaluate() runs once per epoch. Die in level 1 before its first checkpoint; then, on the
    # re-run, in level 2 after its first checkpoint (so that one resumes mid-level).
    for kill_at in (3, 4):
        killed_at_evaluation(monkeypatch, kill_at, lambda: run_replicate(exp, killed, data, 1, 2, progress=False))
    run_replicate(exp, killed, data, 1, 2, progress=False)
    a, b = _all_files(straight), _all_files(killed)
    assert a.keys() == b.keys() and len(a) == 2 + 3 * 2  # init, rewind, 3 x (mask, model)
    for k in a:
        ta, tb = layout.load_tensors(straight / k), layout.load_tensors(killed / k)
        assert all(torch.equal(ta[n], tb[n]) for n in ta), k


def test_reinit_reset_draws_fresh_weights(tmp_path, data, monkeypatch):
    """--reset reinit: each level starts from a new draw of the init scheme under its mask: not the
    init, not the rewind point, not another level's draw; and the same draw on every re-run."""
    from sslprune.lottery import build, derive_seed
    exp = tiny_experiment(reset="reinit")
    exp_dir = prepare(exp, tmp_path, data, None, ["t"])
    starts, real_enforcer = [], train_mod.MaskEnforcer

    def spy(backbone, mask):  # built once per training run, just before the first step
        starts.append({n: v.clone() for n, v in backbone.state_dict().items()})
        return real_enforcer(backbone, mask)

    monkeypatch.setattr(train_mod, "MaskEnforcer", spy)
    run_replicate(exp, exp_dir, data, 1, 2, progress=False)
    init = layout.load_tensors(layout.replicate_dir(exp_dir, 1) / layout.INIT)
    rewind = layout.load_tensors(layout.replicate_dir(exp_dir, 1) / layout.REWIND)
    conv = "features.0.weight"
    for level in (1, 2):
        mask = layout.load_tensors(layout.level_dir(exp_dir, 1, level) / layout.MASK)
        fresh = build(exp, data, seed=derive_seed("reinit", 1, level))[0].state_dict()
        for n in mask:
            assert torch.equal(starts[level][n], fresh[n] * mask[n])
        assert not torch.equal(starts[level][conv], init[f"backbone.{conv}"] * mask[conv])
        assert not torch.equal(starts[level][conv], rewind[f"backbone.{conv}"] * mask[conv])
    assert not torch.equal(starts[1][conv], starts[2][conv])


def test_config_mismatch_is_refused_and_nothing_touched(tmp_path, data):
    exp = tiny_experiment()
    exp_dir = prepare(exp, tmp_path, data, None, ["t"])
    run_replicate(exp, exp_dir, data, 1, 0, progress=False)
    cfg = json.loads((exp_dir / layout.CONFIG).read_text())
    cfg["config"]["train"]["lr"] = 0.5
    (exp_dir / layout.CONFIG).write_text(json.dumps(cfg))
    before = _all_files(exp_dir)
    with pytest.raises(UserError, match="different configuration"):
        prepare(exp, tmp_path, data, None, ["t"])
    assert _all_files(exp_dir) == before


def test_paper_preset_reopens_and_other_data_is_refused(tmp_path, data):
    from sslprune.cli import parser, resolve
    from .conftest import tiny_dataset
    exp, _ = resolve(parser().parse_args(["lottery", "--preset", "cifar10-resnet18-paper", "--task", "rotation",
                                          "--batch-size", "64"]))   # the preset's 512 exceeds the tiny data
    assert exp.train.milestones == (80, 120)
    d = prepare(exp, tmp_path, data, None, ["a"])
    assert prepare(exp, tmp_path, data, None, ["b"]) == d          # tuple vs JSON list: same config
    assert [c[0] for c in layout.load_json(d / layout.CONFIG)["commands"]] == ["a", "b"]
    with pytest.raises(UserError, match="other data"):
        prepare(exp, tmp_path, tiny_dataset(seed=1), None, ["c"])
    wide = tiny_dataset()
    wide.train.images = wide.train.images[..., :6]
    with pytest.raises(UserError, match="square images"):
        prepare(exp, tmp_path / "x", wide, None, ["d"])
    assert not (tmp_path / "x").exists()   # nothing written by a command that fails its checks


def test_truncated_files_are_detected(tmp_path, data):
    exp = tiny_experiment()
    exp_dir = prepare(exp, tmp_path, data, None, ["t"])
    run_replicate(exp, exp_dir, data, 1, 1, progress=False)
    mask = layout.level_dir(exp_dir, 1, 1) / layout.MASK
    mask.write_bytes(mask.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated or corrupt"):
        run_replicate(exp, exp_dir, data, 1, 2, progress=False)
    ckpt = tmp_path / "c.pt"
    torch.save({"a": torch.ones(100)}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:50])
    with pytest.raises(UserError, match="truncated or corrupt"):
        layout.load_checkpoint(ckpt)


def test_retrain_rotation_mask_on_labels(tmp_path, data, monkeypatch):
    exp = tiny_experiment(task="rotation")
    exp_dir = prepare(exp, tmp_path, data, None, ["t"])
    run_replicate(exp, exp_dir, data, 1, 2, progress=False)
    starts = {}
    import sslprune.stacked as stacked_mod   # a re-training alone goes through stacked.train_stacked's train()
    real_train = stacked_mod.train
    real_enforcer = train_mod.MaskEnforcer

    def spy(backbone, task, data, cfg, aug, mask, out, *a, **k):
        def enforcer(b, m):  # the weights training really starts from
            starts[out.name] = ({n: v.clone() for n, v in b.state_dict().items()}, task, m)
            return real_enforcer(b, m)
        monkeypatch.setattr(train_mod, "MaskEnforcer", enforcer)
        return real_train(backbone, task, data, cfg, aug, mask, out, *a, **k)

    monkeypatch.setattr(stacked_mod, "train", spy)
    for reset in ("rewind", "reinit", "random"):
        res = retrain(exp, exp_dir, data, 1, 2, reset, progress=False)
        assert 0 <= res["test_acc"] <= 1
    mask = layout.load_tensors(layout.level_dir(exp_dir, 1, 2) / layout.MASK)
    rewind = layout.load_tensors(layout.replicate_dir(exp_dir, 1) / layout.REWIND)
    w, task, used_mask = starts["retrain_rewind"]
    assert task.name == "labels" and task.head.out_features == data.num_classes  # fresh label head
    assert all(torch.equal(w[n], rewind[f"backbone.{n}"] * mask[n]) for n in mask)
    w2, _, m2 = starts["retrain_reinit"]
    assert all(torch.equal(m2[n], mask[n]) for n in mask)
    assert not torch.equal(w2["features.0.weight"], w["features.0.weight"])
    _, _, rnd = starts["retrain_random"]
    assert sum(int(m.sum()) for m in rnd.values()) == sum(int(m.sum()) for m in mask.values())
    assert any(not torch.equal(rnd[n], mask[n]) for n in mask)
    # random masks are nested across levels
    retrain(exp, exp_dir, data, 1, 1, "random", progress=False)
    r1 = layout.load_tensors(layout.level_dir(exp_dir, 1, 1) / "retrain_random" / layout.MASK)
    assert all(not (rnd[n] & ~r1[n]).any() for n in rnd)
