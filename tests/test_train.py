import pytest
import torch

from sslprune import layout
from sslprune import train as train_mod
from sslprune.lottery import build
from sslprune.pruning import dense_mask, prunable, prune_iteratively
from sslprune.errors import UserError
from sslprune.train import learning_rate, train

from .conftest import killed_at_evaluation, tiny_experiment


def _pruned_mask(backbone, levels=3):
    return prune_iteratively(backbone, levels, 0.2)


def test_learns_and_pruned_weights_stay_zero(tmp_path, data):
    exp = tiny_experiment(epochs=10)  # 30 steps: enough for batch-norm's running statistics
    backbone, task = build(exp, data, seed=0)
    mask = _pruned_mask(backbone)
    res = train(backbone, task, data, exp.train, exp.data, mask, tmp_path / "run", seed=0, progress=False)
    assert res["test_acc"] > 0.8  # 3 classes: chance is 1/3
    for n, w in prunable(backbone).items():
        assert (w[~mask[n]] == 0).all()          # Adam + L2 did not revive pruned weights
    saved = layout.load_tensors(tmp_path / "run" / layout.MODEL)
    for n in mask:
        assert (saved[f"backbone.{n}"][~mask[n]] == 0).all()
    log = (tmp_path / "run" / layout.LOG).read_text().splitlines()
    assert len(log) == 10 and not (tmp_path / "run" / layout.CHECKPOINT).exists()


@pytest.mark.parametrize("optimizer,accumulate", [("lars", 1), ("lars", 2), ("sgd", 1), ("adam", 1)])
def test_a_pruned_network_trains_as_if_alone(tmp_path, data, optimizer, accumulate):
    """The kept weights never feel the pruned ones: junk added to the pruned weights' gradients
    changes nothing (LARS's layer-wise trust ratio would carry it into every kept weight's step: the
    LARS cases fail without the gradients' mask; SGD and Adam, element-wise, guard the rest), and
    the pruned weights stay exactly zero under each optimizer (momentum and decay included)."""
    exp = tiny_experiment(optimizer=optimizer, lr=0.05 if optimizer != "adam" else 3e-3, momentum=0.9,
                          weight_decay=1e-3, epochs=1, accumulate=accumulate)

    def run(out, junk):
        backbone, task = build(exp, data, seed=0)
        mask = _pruned_mask(backbone)
        if junk:
            for n, w in prunable(backbone).items():
                w.register_hook(lambda g, m=mask[n]: g + 100.0 * (~m))   # (out, in, kh, kw), pruned entries only
        train(backbone, task, data, exp.train, exp.data, mask, out, seed=0, progress=False)
        return prunable(backbone), mask

    clean, mask = run(tmp_path / "clean", junk=False)
    noisy, _ = run(tmp_path / "junk", junk=True)
    for n, w in clean.items():
        assert (w[~mask[n]] == 0).all() and (noisy[n][~mask[n]] == 0).all()
        torch.testing.assert_close(noisy[n], w, rtol=0, atol=0)


def test_resume_after_kill_is_bitwise_identical(tmp_path, data, monkeypatch):
    exp = tiny_experiment(epochs=3)

    def run(out):
        backbone, task = build(exp, data, seed=0)
        return train(backbone, task, data, exp.train, exp.data, _pruned_mask(backbone), out, seed=5,
                     snapshot=(2, out / "snap.safetensors"), progress=False)

    run(tmp_path / "straight")
    # killed during epoch 2's evaluation, after epoch 1's checkpoint
    killed_at_evaluation(monkeypatch, 2, lambda: run(tmp_path / "killed"))
    assert layout.load_checkpoint(tmp_path / "killed" / layout.CHECKPOINT)["epoch"] == 1
    run(tmp_path / "killed")
    for f in (layout.MODEL, "snap.safetensors"):
        a = layout.load_tensors(tmp_path / "straight" / f)
        b = layout.load_tensors(tmp_path / "killed" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    assert (tmp_path / "straight" / layout.LOG).read_text().count("\n") == 3
    assert (tmp_path / "killed" / layout.LOG).read_text().count("\n") == 3


def test_the_rewind_point_is_the_network_after_exactly_k_updates(tmp_path, data):
    """A snapshot after k = 3 updates (one epoch of 96 images at batch 32) of a 2-epoch run is, bit
    for bit, the network a 1-epoch run ends with: same seed, constant lr, so both take the same 3
    steps. BN statistics included; the 3rd update, not the 2nd or the 4th."""
    exp = tiny_experiment(epochs=2, schedule="constant")
    backbone, task = build(exp, data, seed=0)
    train(backbone, task, data, exp.train, exp.data, dense_mask(backbone), tmp_path / "two", seed=5,
          snapshot=(3, tmp_path / "snap.safetensors"), progress=False)
    one = tiny_experiment(epochs=1, schedule="constant")
    backbone, task = build(one, data, seed=0)
    train(backbone, task, data, one.train, one.data, dense_mask(backbone), tmp_path / "one", seed=5, progress=False)
    snap, end = layout.load_tensors(tmp_path / "snap.safetensors"), layout.load_tensors(tmp_path / "one" / layout.MODEL)
    assert snap.keys() == end.keys() and all(torch.equal(snap[k], end[k]) for k in snap)
    two = layout.load_tensors(tmp_path / "two" / layout.MODEL)
    assert not torch.equal(two["backbone.features.0.weight"], snap["backbone.features.0.weight"])


def test_finished_run_is_loaded_not_retrained(tmp_path, data, monkeypatch):
    exp = tiny_experiment()
    backbone, task = build(exp, data, seed=0)
    first = train(backbone, task, data, exp.train, exp.data, dense_mask(backbone), tmp_path, seed=0, progress=False)
    monkeypatch.setattr(train_mod, "evaluate", lambda *a, **k: pytest.fail("retrained"))
    b2, t2 = build(exp, data, seed=1)
    assert train(b2, t2, data, exp.train, exp.data, dense_mask(b2), tmp_path, seed=0, progress=False) == first
    assert all(torch.equal(a, b) for a, b in zip(backbone.state_dict().values(), b2.state_dict().values()))


def test_schedules():
    exp = tiny_experiment(lr=1.0, epochs=10, schedule="step", milestones=(5, 8), warmup_epochs=1)
    lrs = [learning_rate(exp.train, s, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[49] == 1.0
    assert lrs[50] == pytest.approx(0.1) and lrs[80] == pytest.approx(0.01)
    cos = tiny_experiment(lr=1.0, epochs=10, schedule="cosine")
    assert learning_rate(cos.train, 0, 10) == 1.0 and learning_rate(cos.train, 99, 10) < 0.01


def test_batch_width_is_what_the_sampler_draws():
    from sslprune.tasks.sampling import PAIRED, UNIFORM
    samplers = {"paired": PAIRED, "uniform": UNIFORM}
    from sslprune.tasks import UNLABELLED
    labels = torch.tensor([0, 1, 2] * 4 + [UNLABELLED] * 3)           # 12 labelled, 3 unlabelled
    g = torch.Generator().manual_seed(0)
    for sampler, b in (("paired", 9), ("paired", 4), ("uniform", 9), ("uniform", 40)):
        s = samplers[sampler]
        assert s.epoch_batches(labels, b, g).shape[1] == s.batch_width(labels, b), (sampler, b)
    assert PAIRED.batch_width(labels, 9) == 6 and UNIFORM.batch_width(labels, 40) == 15


def test_a_checkpoint_of_an_older_version_is_refused_in_one_line(tmp_path, data):
    """Checkpoints fingerprinted repr(cfg) before; their run is refused with the fix, not resumed wrongly."""
    exp = tiny_experiment()
    backbone, task = build(exp, data, seed=0)
    out = tmp_path / "run"
    out.mkdir()
    layout.save_checkpoint(out / layout.CHECKPOINT, {"fingerprint": {"seed": 1, "cfg": repr(exp.train)}, "epoch": 1})
    with pytest.raises(UserError, match="written by an older sslprune"):
        train(backbone, task, data, exp.train, exp.data, dense_mask(backbone), out, seed=1)


def test_lars_is_solo_learns():
    """Two steps of LARS against the update written out: trust ratio eta ||w|| / (||g|| + wd ||w||),
    lr-relative and clipped at 1, weight decay inside it; 1-d tensors plain SGD with momentum, no decay."""
    from sslprune.lars import LARS
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    grads = [(torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64))
             for _ in range(2)]
    pw, pb = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())
    lr, wd, eta, m = 0.3, 1e-4, 0.02, 0.9
    opt = LARS([pw, pb], lr=lr, momentum=m, weight_decay=wd, eta=eta)
    bw = bb = None
    for gw, gb in grads:
        pw.grad, pb.grad = gw.clone(), gb.clone()
        opt.step()
        ratio = min(eta * w.norm() / (gw.norm() + wd * w.norm() + 1e-8) / lr, 1.0)
        dw = (gw + wd * w) * ratio
        bw = dw if bw is None else m * bw + dw
        bb = gb if bb is None else m * bb + gb
        w, b = w - lr * bw, b - lr * bb
        torch.testing.assert_close(pw.detach(), w)
        torch.testing.assert_close(pb.detach(), b)
    assert ratio < 1   # the clip did not hide the trust ratio


def test_the_gated_vicreg_preset_is_the_papers():
    from sslprune.config import PRESETS, Experiment
    p = PRESETS["cifar10-resnet18-vicreg-gated"]
    assert (p["optimizer"], p["lr"], p["batch_size"], p["epochs"], p["budget"], p["levels"]) == ("lars", 0.3, 256, 500, 0.3, 0)
    Experiment.from_flat(p).validate()


@pytest.mark.parametrize("task_name", ["labels", "rotation"])
def test_accumulated_micro_batches_make_the_whole_batch_update(tmp_path, data, task_name, monkeypatch):
    """--accumulate 4: each batch of 32 goes through the task in 4 parts of 8 images, and without
    batch-norm the trained weights are the un-accumulated run's, to float rounding (SGD + momentum,
    2 epochs, 6 updates); RotNet's 4 rotations of each part included."""
    from dataclasses import replace

    from torch import nn

    from sslprune.tasks import TASKS

    exp = tiny_experiment(task=task_name, optimizer="sgd", lr=0.05, momentum=0.9, schedule="constant", crop_pad=1)
    finals, sizes = [], {}
    for parts in (1, 4):
        sizes[parts] = []
        torch.manual_seed(0)
        backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        task = TASKS[task_name](exp.task, 8, data.num_classes, len(data.train))
        step = task.step
        monkeypatch.setattr(task, "step", lambda b, batch, n, seen=sizes[parts]: seen.append(len(batch.local().images))
                            or step(b, batch, n))
        train(backbone, task, data, replace(exp.train, accumulate=parts), exp.data, dense_mask(backbone),
              tmp_path / f"parts{parts}", seed=3, progress=False)
        finals.append(layout.load_tensors(tmp_path / f"parts{parts}" / layout.MODEL))
    # 96 images, batch 32, 2 epochs: 6 updates; in 4 parts, 24 forward passes of 8 (evaluation's batches are larger)
    assert [s for s in sizes[1] if s <= 32] == [32] * 6 and [s for s in sizes[4] if s <= 32] == [8] * 24
    a, b = finals
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    assert any(not torch.equal(a[k], b[k]) for k in a)                # two computations, one result


def test_fine_tuning_folders_keep_their_names_when_train_gains_a_field():
    """A fine-tuning's folder is a hash of its Train settings' repr (transfer.finetune_out): a field
    added later (accumulate) is left out at its default, so folders made before keep their names."""
    from dataclasses import replace

    from sslprune.config import Train, stable_repr
    t = Train(optimizer="adam", lr=1e-3, weight_decay=1e-4, batch_size=128, epochs=20, schedule="cosine")
    assert stable_repr(t) == ("Train(optimizer='adam', lr=0.001, momentum=0.0, weight_decay=0.0001, batch_size=128, "
                              "epochs=20, schedule='cosine', milestones=(), gamma=0.1, warmup_epochs=0)")
    assert stable_repr(replace(t, accumulate=2)) == repr(replace(t, accumulate=2))


def test_a_checkpoint_missing_its_state_is_refused(tmp_path):
    """A checkpoint.pt whose fingerprint matches but which lacks the state a resume reads: one line."""
    layout.save_checkpoint(tmp_path / layout.CHECKPOINT, {"fingerprint": {"seed": 1}, "epoch": 1})
    with pytest.raises(UserError, match="no generator, history, optimizer, torch_rng, weights"):
        train_mod.read_checkpoint(tmp_path / layout.CHECKPOINT, {"seed": 1})
