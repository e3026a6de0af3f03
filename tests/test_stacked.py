"""K networks trained as one (sslprune/stacked.py) against the same K trained one at a time."""
from __future__ import annotations

import pytest
import torch

from sslprune import layout
from sslprune.lottery import build
from sslprune.pruning import SCORES, dense_mask, prunable, prune
from sslprune.runtime import Runtime
from sslprune.stacked import Job, train_stacked, why_not
from sslprune.sweep import load_spec
from sslprune.train import train
from sslprune.workers import status

from .conftest import digits_lottery, killed_at_evaluation, tiny_experiment

CPU64 = Runtime(channels_last=False)


def jobs_of(exp, data, root, seeds, model_seeds=(11, 12, 13)):
    """One job per (model seed, data seed): a different init and a different random mask each."""
    jobs = []
    for i, (ms, ds) in enumerate(zip(model_seeds, seeds)):
        backbone, task = build(exp, data, seed=ms, task_name="labels")
        scores = SCORES["random"](prunable(backbone), torch.Generator().manual_seed(ms))
        mask = prune(scores, dense_mask(backbone), 0.5 + 0.1 * i)
        jobs.append(Job(backbone, task, mask, root / f"net_{i}", ds))
    return jobs


def state(job):
    """Everything a finished network is: weights and batch-norm statistics, from its saved model."""
    return layout.load_model(job.out)


@pytest.fixture(autouse=True)
def _float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)   # equality up to rounding, not up to float32's 1e-6
    yield
    torch.set_default_dtype(before)


@pytest.mark.parametrize("seeds,runtime", [((5, 5, 5), CPU64), ((5, 6, 7), Runtime())],
                         ids=["shared data order", "own data orders, channels_last one at a time"])
def test_stacked_training_matches_one_at_a_time(tmp_path, data, seeds, runtime):
    exp = tiny_experiment(epochs=2, weight_decay=1e-3)
    stacked = jobs_of(exp, data, tmp_path / "stacked", seeds)
    alone = jobs_of(exp, data, tmp_path / "alone", seeds)
    assert not why_not(stacked, data, exp.train, runtime)
    finals = train_stacked(stacked, data, exp.train, exp.data, runtime, progress=False)
    expected = [train(j.backbone, j.task, data, exp.train, exp.data, j.mask, j.out, j.seed, runtime, progress=False)
                for j in alone]
    for s, a, fs, fa in zip(stacked, alone, finals, expected):
        got, want = state(s), state(a)
        assert got.keys() == want.keys()
        for name in want:   # conv and head weights, BN running statistics and batch counts
            assert torch.allclose(got[name].double(), want[name].double(), rtol=1e-9, atol=1e-10), name
        for name, m in s.mask.items():   # the masks held: pruned weights exactly zero
            assert bool((got[f"backbone.{name}"][m == 0] == 0).all())
        assert fs["test_acc"] == fa["test_acc"] and abs(fs["train_loss"] - fa["train_loss"]) < 1e-9
        assert fs["stacked"] == 3 and "stacked" not in fa


def test_a_killed_stack_resumes_with_its_optimizer_state(tmp_path, data, monkeypatch):
    """Killed at epoch 2's first evaluation (the 4th: each epoch evaluates the 3 networks in turn):
    each network's checkpoint holds epoch 1, Adam moments included (compared with one-at-a-time's
    checkpoint at the same epoch), and the stack finishes bit for bit where an uninterrupted one ends."""
    exp = tiny_experiment(epochs=3)
    seeds = (5, 6, 7)
    stacked = jobs_of(exp, data, tmp_path / "stacked", seeds)
    killed_at_evaluation(monkeypatch, 4, lambda: train_stacked(stacked, data, exp.train, exp.data, CPU64, progress=False))
    alone = jobs_of(exp, data, tmp_path / "alone", seeds)
    killed_at_evaluation(monkeypatch, 2, lambda: train(alone[0].backbone, alone[0].task, data, exp.train, exp.data,
                                                         alone[0].mask, alone[0].out, alone[0].seed, CPU64, progress=False))
    mine = layout.load_checkpoint(stacked[0].out / layout.CHECKPOINT)
    theirs = layout.load_checkpoint(alone[0].out / layout.CHECKPOINT)
    assert mine["epoch"] == theirs["epoch"] == 1 and mine["fingerprint"]["stacked"]
    for p, entry in theirs["optimizer"]["state"].items():
        for key, value in entry.items():
            assert torch.allclose(mine["optimizer"]["state"][p][key].double(), value.double(), rtol=1e-9, atol=1e-12)
    assert mine["optimizer"]["param_groups"] == theirs["optimizer"]["param_groups"]
    assert torch.equal(mine["generator"], theirs["generator"])

    from sslprune import stacked as stacked_mod
    real, evaluations = stacked_mod.evaluate, []

    def counted(backbone, *a, **k):
        evaluations.append(backbone)
        return real(backbone, *a, **k)
    monkeypatch.setattr(stacked_mod, "evaluate", counted)
    resumed = train_stacked(jobs_of(exp, data, tmp_path / "stacked", seeds), data, exp.train, exp.data, CPU64,
                            progress=False)
    assert len(evaluations) == 2 * 3   # epochs 2 and 3 of the 3 networks: the resume trained only those
    monkeypatch.setattr(stacked_mod, "evaluate", real)
    whole = train_stacked(jobs_of(exp, data, tmp_path / "whole", seeds), data, exp.train, exp.data, CPU64,
                          progress=False)
    for r, w, jr, jw in zip(resumed, whole, stacked, jobs_of(exp, data, tmp_path / "whole", seeds)):
        assert r["train_loss"] == w["train_loss"] and r["test_acc"] == w["test_acc"]
        a, b = state(jr), state(jw)
        assert all(torch.equal(a[n], b[n]) for n in a)   # resuming a stack is bit-identical


def test_a_stack_killed_between_its_networks_saves_resumes(tmp_path, data, monkeypatch):
    """Killed at the 2nd evaluation: network 0 saved epoch 1, networks 1-2 nothing. Network 0 is
    not resumed one at a time (its checkpoint is a stack's); re-running finishes all three, as two
    stacks (1 network at epoch 1, 2 at epoch 0), equal to an uninterrupted stack up to rounding."""
    exp = tiny_experiment(epochs=2)
    seeds = (5, 5, 5)
    jobs = jobs_of(exp, data, tmp_path / "killed", seeds)
    killed_at_evaluation(monkeypatch, 2, lambda: train_stacked(jobs, data, exp.train, exp.data, CPU64, progress=False))
    assert [(j.out / layout.CHECKPOINT).exists() for j in jobs] == [True, False, False]
    j = jobs[0]
    from sslprune.errors import UserError
    with pytest.raises(UserError, match="stacking"):
        train(j.backbone, j.task, data, exp.train, exp.data, j.mask, j.out, j.seed, CPU64, progress=False)
    train_stacked(jobs_of(exp, data, tmp_path / "killed", seeds), data, exp.train, exp.data, CPU64, progress=False)
    whole = jobs_of(exp, data, tmp_path / "whole", seeds)
    train_stacked(whole, data, exp.train, exp.data, CPU64, progress=False)
    for a, b in zip(jobs, whole):
        got, want = state(a), state(b)
        assert all(torch.allclose(got[n].double(), want[n].double(), rtol=1e-9, atol=1e-10) for n in want)


def test_what_cannot_be_stacked_trains_one_at_a_time(tmp_path, data):
    exp = tiny_experiment(epochs=1)
    jobs = jobs_of(exp, data, tmp_path, (5, 5, 5))
    assert "element-wise" in why_not(jobs, data, tiny_experiment(optimizer="lars").train, CPU64)
    mixed = jobs[:2] + [Job(jobs[2].backbone, build(exp, data, seed=1, task_name="rotation")[1], jobs[2].mask,
                            jobs[2].out, 5)]
    assert "task's step" in why_not(mixed, data, exp.train, CPU64)
    other, task = build(tiny_experiment(model="resnet20"), data, seed=1, task_name="labels")
    bigger = jobs[:2] + [Job(other, task, dense_mask(other), jobs[2].out, 5)]
    assert why_not(bigger, data, exp.train, CPU64) == "different networks or tasks"
    assert "wandb" in why_not(jobs, data, exp.train, Runtime(track="wandb"))
    lars = tiny_experiment(epochs=1, optimizer="lars", lr=0.1)
    finals = train_stacked(jobs, data, lars.train, lars.data, CPU64, progress=False)
    assert all("stacked" not in f for f in finals) and all(layout.is_done(j.out) for j in jobs)
    alone = jobs_of(exp, data, tmp_path / "alone", (5,))   # one network: nothing to stack it with
    assert "stacked" not in train_stacked(alone, data, exp.train, exp.data, CPU64, progress=False)[0]


def _done(run_dir):
    return [layout.load_json(d / layout.DONE) for d in sorted(run_dir.glob("replicate_*/level_*/retrain_*"))]


def test_retrain_stack_on_the_command_line(tmp_path):
    """`retrain --stack 3`: a level's three re-trainings as one network, each in its own folder;
    bad K refused in one line."""
    from sslprune.cli import main
    torch.set_default_dtype(torch.float32)   # as a user runs it
    run = digits_lottery(tmp_path / "runs", 1)
    assert main(["retrain", str(run), "--variants", "rewind,reinit,random", "--stack", "3", "--quiet"]) == 0
    done = _done(run)
    assert len(done) == 6 and all(d["stacked"] == 3 for d in done)
    assert main(["retrain", str(run), "--stack", "-1", "--quiet"]) == 2
    # the same re-training asked twice: read back, not a stack waiting on its own lock
    assert main(["retrain", str(run), "--variants", "rewind,rewind", "--level", "1,0-1", "--stack", "4", "--quiet"]) == 0


def test_a_sweep_stacks_a_levels_variants(tmp_path, capsys):
    """`sweep --stack 4`: the worker that takes a level's first re-training claims the others."""
    from sslprune.cli import main
    torch.set_default_dtype(torch.float32)
    spec = tmp_path / "sweep.toml"
    spec.write_text('root = "runs"\nlevels = 1\nreplicates = 1\n[base]\npreset = "demo"\ntrain_per_class = 30\n'
                    'test_per_class = 10\nepochs = 1\nbatch_size = 32\ntask = "labels"\n[evaluations]\n'
                    'retrain = ["rewind", "reinit", "random"]\n')
    assert main(["sweep", str(spec), "--stack", "4"]) == 0
    done = _done(next((tmp_path / "runs").glob("*/")))
    assert len(done) == 6 and all(d["stacked"] == 3 for d in done)
    st = status(load_spec(spec))   # the claimed steps are in the ledger as the worker's: every epoch counted
    assert st["done"] == st["steps"] == 7 and not st["finished_twice"]
    assert st["epochs_trained"] == 2 + 6   # the lottery's 2 levels of 1 epoch, 6 re-trainings of 1


def test_a_diverged_network_stops_alone(tmp_path, data):
    """Network 1 of 3 starts with a non-finite head: the stack's error names it, its folder holds no
    result, and networks 0 and 2 train to the end; re-running finishes nothing more and says so again."""
    from sslprune.errors import UserError
    exp = tiny_experiment(epochs=2)
    for attempt in range(2):
        jobs = jobs_of(exp, data, tmp_path, (5, 5, 5))
        with torch.no_grad():
            jobs[1].task.head.weight.fill_(float("inf"))
        with pytest.raises(UserError, match="net_1.*diverged|diverged.*net_1"):
            train_stacked(jobs, data, exp.train, exp.data, CPU64, progress=False)
        assert [layout.is_done(j.out) for j in jobs] == [True, False, True]
    alone = jobs_of(exp, data, tmp_path / "alone", (5, 5, 5))   # the survivors are what they would be anyway
    train_stacked([alone[0], alone[2]], data, exp.train, exp.data, CPU64, progress=False)
    for a, b in ((jobs[0], alone[0]), (jobs[2], alone[2])):
        got, want = state(a), state(b)
        assert all(torch.allclose(got[n].double(), want[n].double(), rtol=1e-9, atol=1e-10) for n in want)
