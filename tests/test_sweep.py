"""Sweeps: independent workers share one run root; a worker killed mid-step loses nothing."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sslprune import layout
from sslprune.cli import main
from sslprune.errors import UserError
from sslprune.sweep import Sweep, load_spec
from sslprune import workers
from sslprune.workers import busy_seconds, status

SPEC = """
root = "runs"
levels = 1
replicates = {replicates}

[base]
preset = "demo"
train_per_class = 30
test_per_class = 10
epochs = {epochs}
batch_size = 32

[grid]
task = ["labels", "rotation"]

[evaluations]
retrain = {retrain}
"""


def _spec(tmp_path, epochs=3, replicates=2, retrain=("rewind", "random")):
    path = tmp_path / "sweep.toml"
    path.write_text(SPEC.format(epochs=epochs, replicates=replicates, retrain=json.dumps(list(retrain))))
    return path


def _ledger(root):
    path = root / "sweep_ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_worker_killed_mid_step_loses_nothing_and_no_step_runs_twice(tmp_path):
    spec = _spec(tmp_path, epochs=6)
    root = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sslprune", "sweep", str(spec), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    victim, deadline = None, time.time() + 120
    while victim is None and time.time() < deadline:  # a lottery step with an epoch checkpointed
        started = {e["step"]: e["pid"] for e in _ledger(root) if e["event"] == "start"}
        finished = {e["step"] for e in _ledger(root) if e["event"] == "done"}
        for step, pid in started.items():
            if step.endswith("lottery") and step not in finished and \
                    list((root / step.split("/")[0]).glob(f"{step.split('/')[1]}/level_*/train/{layout.CHECKPOINT}")):
                victim = (step, pid)
        time.sleep(0.05)
    assert victim, "no lottery step was seen mid-way"
    os.kill(victim[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    # the other worker took the abandoned step over (its lock died with the killed process)
    ledger = _ledger(root)
    takeover = [e for e in ledger if e["step"] == victim[0] and e["event"] == "start" and e["pid"] != victim[1]]
    assert takeover and takeover[0]["epochs_before"] > 0          # resumed from the checkpoint
    st = status(load_spec(spec))
    assert st["done"] == st["steps"] == 2 * 2 * (1 + 2 * 2) and not st["pending"], (out, err)
    assert st["finished_twice"] == []
    assert st["epochs_without_reuse"] > st["epochs_trained"] > 0
    assert st["worker_seconds"] > 0 and st["worker_cpu_seconds"] > 0
    # a re-run finds everything done and starts nothing
    n = len(ledger)
    assert main(["sweep", str(spec)]) == 0
    assert len(_ledger(root)) == n


def test_status_says_which_steps_run_now_and_how_far(tmp_path, capsys):
    """--status names the steps a worker holds (their lock: any machine sharing the root) with the first
    unfinished training and its last saved epoch; it holds no lock and creates no lock file."""
    spec = load_spec(_spec(tmp_path, epochs=3, replicates=1, retrain=("rewind",)))
    sweep = Sweep(spec)
    lottery, other = [s for s in sweep.steps() if s.kind == "lottery"]      # labels', rotation's chains
    layout.save_checkpoint(sweep.train_dirs(lottery)[0] / layout.CHECKPOINT, {"fingerprint": "x", "epoch": 2})
    with layout.file_lock(sweep.lock(lottery)) as mine:   # as a worker holds it
        assert mine
        st = status(spec)
        assert main(["sweep", str(spec.path), "--status"]) == 0
    assert st["running"] == [{"step": sweep.key(lottery), "since": None, "at": "level_0/train, epoch 2 saved"}]
    assert f"running: {sweep.key(lottery)} (at level_0/train, epoch 2 saved)" in capsys.readouterr().out
    assert status(spec)["running"] == [] and not sweep.lock(other).exists()


def test_busy_seconds_counts_each_workers_time_once():
    """The cost of a sweep from its ledger: a stack's overlapping steps once, a killed attempt not at
    all, another spec's steps not, and a new process that got an old pid on its own clock."""
    def ev(event, step, t, cpu, pid, worker="local-0"):
        return {"event": event, "step": step, "time": t, "cpu": cpu, "pid": pid, "worker": worker}
    ledger = [ev("start", "a", 0, 0, 1), ev("done", "a", 10, 8, 1),          # one worker, two steps in turn
              ev("start", "b", 12, 8, 1), ev("done", "b", 20, 15, 1),
              ev("start", "c", 0, 0, 2, "local-1"), ev("start", "d", 0, 0, 2, "local-1"),   # a stack of two
              ev("done", "d", 5, 4, 2, "local-1"), ev("done", "c", 6, 5, 2, "local-1"),
              ev("start", "e", 0, 0, 3), ev("start", "e", 3, 1, 4), ev("done", "e", 9, 6, 4),  # 3 was killed
              ev("start", "a", 100, 0, 1), ev("done", "a", 110, 9, 1),    # pid 1 again, a new process
              ev("start", "other", 0, 0, 5), ev("done", "other", 50, 50, 5)]
    keys = {"a", "b", "c", "d", "e"}
    assert busy_seconds(ledger, keys) == 10 + 8 + 6 + 6 + 10
    assert busy_seconds(ledger, keys, clock="cpu") == 8 + 7 + 5 + 5 + 9
    old = [{k: v for k, v in e.items() if k != "cpu"} for e in ledger]    # a ledger from before 'cpu'
    assert busy_seconds(old, keys) == 40 and busy_seconds(old, keys, clock="cpu") is None
    assert busy_seconds(old[:2] + ledger[2:], keys, clock="cpu") is None     # part logged: no total from a part


def test_one_sweep_runs_several_specs_with_shared_workers(tmp_path, capsys, monkeypatch):
    """`sslprune sweep A.toml B.toml`: one pool of workers takes the steps of both (a worker with
    nothing ready in one spec takes the other's), and each spec's status is said under its name (its
    path where two share a name); a spec given twice runs once; specs naming different devices are
    refused before anything is written."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    a = _spec(tmp_path, epochs=1, replicates=1, retrain=("rewind",))
    (tmp_path / "sub").mkdir()
    b = tmp_path / "sub" / "sweep.toml"          # the same name, another folder, its own run root
    b.write_text(a.read_text().replace('task = ["labels", "rotation"]', 'task = ["labels"]')
                 .replace("batch_size = 32", "batch_size = 16"))
    cuda = a.with_name("cuda.toml")
    cuda.write_text(a.read_text().replace('root = "runs"', 'root = "other"\ndevice = "cuda"'))
    assert main(["sweep", str(a), str(cuda)]) == 2
    assert "specs run together train on one device; these name sweep.toml: cpu, cuda.toml: cuda" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "other").exists()
    assert main(["sweep", str(a), str(b), str(tmp_path / "sub" / ".." / "sweep.toml"), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert f"{a}: 6/6 steps done" in out and f"{b}: 3/3 steps done" in out and out.count("steps done") == 2
    assert workers.finished_twice(_ledger(tmp_path / "runs")) == []


def test_a_worker_starts_every_chain_before_any_evaluation(tmp_path, monkeypatch):
    """Across specs, a worker takes every lottery chain no one has started before an evaluation of a
    finished level (a chain trains level after level: the later it starts, the later the study ends)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    a = _spec(tmp_path, epochs=1, replicates=1, retrain=("rewind",))
    b = a.with_name("b.toml")
    b.write_text(a.read_text().replace('task = ["labels", "rotation"]', 'task = ["labels"]')
                 .replace("batch_size = 32", "batch_size = 16"))
    assert workers.work([a, b], "w") == 2 * (1 + 2) + (1 + 2)
    kinds = ["lottery" if e["step"].endswith("/lottery") else "evaluation" for e in _ledger(tmp_path / "runs")
             if e["event"] == "start"]
    assert kinds == ["lottery"] * 3 + ["evaluation"] * 6


def test_a_spec_is_not_told_of_another_specs_repeats(tmp_path):
    """The ledger is the run root's: a step of another spec sharing it, done twice, is that spec's."""
    spec = load_spec(_spec(tmp_path, epochs=1, replicates=1, retrain=()))
    spec.root.mkdir()
    twice = [{"event": "start", "step": "other/x", "pid": p, "worker": "w", "epochs_before": 0} for p in (1, 2)] + \
            [{"event": "done", "step": "other/x", "pid": p, "worker": "w", "epochs": 3} for p in (1, 2)]
    (spec.root / "sweep_ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in twice))
    assert workers.finished_twice(_ledger(spec.root)) == ["other/x"] and status(spec)["finished_twice"] == []


def test_a_chain_two_specs_share_is_no_repeat_but_training_done_twice_is():
    """finished_twice: a 1-epoch chain a rewind spec takes to level 12 and the labels spec then to 30
    (two finished attempts, the second from where the first stopped), and a resumed kill, are not
    repeats; two attempts that both trained from the start are, and so is a probe finished twice."""
    def ev(event, step, pid, n):
        return {"event": event, "step": step, "pid": pid, "worker": "w", **({"epochs_before": n} if event == "start" else {"epochs": n})}
    ledger = [ev("start", "chain", 1, 0), ev("done", "chain", 1, 130),     # rewind.toml: levels 0-12
              ev("start", "chain", 2, 130), ev("done", "chain", 2, 180),   # labels.toml: 13-30 on top
              ev("start", "r", 3, 0), ev("start", "r", 4, 7), ev("done", "r", 4, 8),   # 3 killed, 4 resumed
              ev("start", "x", 5, 0), ev("start", "x", 6, 0), ev("done", "x", 5, 15), ev("done", "x", 6, 15),
              ev("start", "probe", 7, 0), ev("done", "probe", 7, 0), ev("start", "probe", 8, 0), ev("done", "probe", 8, 0)]
    assert workers.finished_twice(ledger) == ["probe", "x"]    # a probe trains no epochs: twice is twice


def test_local_workers_take_the_visible_gpus_in_turn(monkeypatch):
    """`device = "cuda"` with several GPUs: worker i sees GPU i mod n alone (CUDA_VISIBLE_DEVICES set in
    the worker before it touches CUDA); CPU, one GPU and a GPU named by number are left as they are."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, GPU-ab12,5")
    assert workers.worker_gpus(4, "cuda") == ["3", "GPU-ab12", "5", "3"]
    assert workers.worker_gpus(2, "cuda:1") == workers.worker_gpus(2, "cpu") == [None, None]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    assert workers.worker_gpus(3, "cuda") == [None] * 3
    seen = []
    monkeypatch.setattr(workers, "work", lambda *a, **k: seen.append(os.environ["CUDA_VISIBLE_DEVICES"]))
    workers._worker_main([], "local-1", gpu="GPU-ab12")
    assert seen == ["GPU-ab12"]


def test_sweep_through_submitit_local_executor(tmp_path, capsys, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = _spec(tmp_path, epochs=1, replicates=1, retrain=("rewind",))
    assert main(["sweep", str(spec), "--workers", "2", "--submit", "local"]) == 0
    out = capsys.readouterr().out
    assert "submitted 2 job(s)" in out and "6/6 steps done" in out
    st = status(load_spec(spec))
    assert st["finished_twice"] == [] and not st["pending"]


def test_bad_specs_fail_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('levels = 1\n[grid]\nbatchsize = [32]\n')
    assert main(["sweep", str(bad), "--status"]) == 2
    assert "'batchsize' is no configuration field" in capsys.readouterr().err
    bad.write_text('level = 1\n')
    assert main(["sweep", str(bad)]) == 2
    assert "unknown key(s) ['level']" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "none.toml")]) == 2
    assert not (tmp_path / "runs").exists()


def test_a_sweep_probes_and_fine_tunes_every_level(tmp_path, capsys):
    spec = tmp_path / "sweep.toml"
    spec.write_text(SPEC.format(epochs=1, replicates=1, retrain="[]").replace('["labels", "rotation"]', '["rotation"]') + """
[[evaluations.probe]]
dataset = "digits"
train_per_class = 20
test_per_class = 10

[[evaluations.finetune]]
dataset = "digits"
train_per_class = 20
test_per_class = 10
epochs = 1
lr = 0.001

[evaluations.stability]
level = [1]
points = 3
""")
    assert main(["sweep", str(spec)]) == 0
    st = status(load_spec(spec))
    assert st["done"] == st["steps"] == 1 + 2 * 2 + 1 and st["finished_twice"] == []
    (exp,) = [d for d in (tmp_path / "runs").iterdir() if d.is_dir()]
    for level in (0, 1):
        ldir = layout.level_dir(exp, 1, level)
        (probe,) = ldir.glob("probe_digits_*")
        assert layout.load_json(probe / layout.DONE)["n_train"] == 200
        (tuned,) = ldir.glob("finetune_digits_*")
        assert layout.load_json(tuned / layout.DONE)["epochs"] == 1
    stable = layout.load_json(layout.stability_dir(layout.level_dir(exp, 1, 1)) / layout.DONE)
    assert len(stable["test_acc"]) == 3 and not layout.stability_dir(layout.level_dir(exp, 1, 0)).exists()
    # the report reads them like those of 'sslprune eval'
    capsys.readouterr()
    assert main(["report", str(exp), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "results.csv").read_text()
    assert "probe" in table and "finetune" in table
    spent = workers.cost(tmp_path / "runs", exp.name)     # from the ledger, as the report's compute column
    assert spent is not None and 0 < spent[1] and workers.cost(tmp_path / "runs", "other_experiment") is None
    row = next(line for line in (tmp_path / "report" / "summary.md").read_text().splitlines() if line.startswith(f"| {exp.name}"))
    assert row.endswith(f"| {spent[0] / 60:.1f} worker-min, {spent[1] / 60:.1f} CPU-min |")   # a tiny sweep: minutes
    n = len(_ledger(tmp_path / "runs"))
    assert main(["sweep", str(spec)]) == 0 and len(_ledger(tmp_path / "runs")) == n   # nothing re-run
    # the same spec asking stability for other options is refused, not served the 3-point path
    spec.write_text(spec.read_text().replace("points = 3", "points = 5"))
    capsys.readouterr()
    assert main(["sweep", str(spec), "--status"]) == 2
    assert "was measured with --points 3" in capsys.readouterr().err


@pytest.mark.parametrize("evaluations, message", [
    ('[evaluations]\nprobes = []\n', "unknown evaluation(s) ['probes']"),
    ('[[evaluations.probe]]\ndata_root = "x"\n', "evaluations.probe needs a dataset"),
    ('[[evaluations.finetune]]\ndataset = "digits"\nepoch = 3\n', "unknown key(s) ['epoch']"),
    ('[[evaluations.finetune]]\ndataset = "digits"\nlr = -1.0\n', "--lr must be > 0"),
    ('[evaluations.stability]\nlevels = [1]\n', "evaluations.stability: unknown key 'levels'"),
    ('[evaluations.stability]\nbn = "running"\n', "evaluations.stability.bn must be one of recompute, keep"),
    ('[evaluations.stability]\npoints = "3"\n', "evaluations.stability.points must be int"),
    ('[evaluations]\nlevel = [2]\n', "evaluations.level must be a non-empty list of levels 0..1"),
    ('[evaluations.stability]\nlevel = [0, 9]\n', "evaluations.stability.level names level(s) [9] outside the spec's 0..1"),
    ('[evaluations]\nlevel = []\n', "evaluations.level must be a non-empty list"),
    ('[evaluations]\nlevel = [true]\n', "evaluations.level must be a non-empty list"),
    ('[evaluations]\nlevel = [0]\n[evaluations.stability]\nlevel = [1]\n',
     "evaluations.stability.level names level(s) [1] that evaluations.level ([0]) leaves out"),
])
def test_bad_evaluations_fail_in_one_line(tmp_path, capsys, evaluations, message):
    bad = tmp_path / "bad.toml"
    bad.write_text(f'levels = 1\n[base]\npreset = "demo"\ntask = "rotation"\n{evaluations}')
    assert main(["sweep", str(bad)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_evaluations_run_at_the_levels_the_spec_keeps(tmp_path):
    """[evaluations] level: every evaluation at those levels only; the lottery chain still makes all;
    an evaluation's own level list (stability) narrows it further."""
    spec = tmp_path / "sweep.toml"
    spec.write_text(SPEC.format(epochs=1, replicates=2, retrain='["rewind", "reinit"]').replace("levels = 1", "levels = 4")
                    + "level = [0, 2, 4]\n[evaluations.stability]\nlevel = [2]\n")
    steps = Sweep(load_spec(spec)).steps()
    evals = {(s.kind, s.level) for s in steps if s.kind != "lottery"}
    assert evals == {(k, lv) for k in ("retrain",) for lv in (0, 2, 4)} | {("stability", 2)}
    assert sum(s.kind == "lottery" for s in steps) == 2 * 2 and load_spec(spec).levels == 4   # 2 tasks x 2 replicates
    assert sum(s.kind == "retrain" for s in steps) == 2 * 2 * 2 * 3


class Toy:
    """A new evaluation, whole: what its module would hold (here the mean |weight| of each level's
    trained network, times a scale), in level_<L>/toy/done.json."""
    name, top_level = "toy", False
    help = description = "mean |weight| of every trained level"

    def spec(self, value, where, here, experiments):
        if not isinstance(value, dict) or set(value) - {"scale"}:
            raise UserError(f"{where} must be a table with an optional scale, got {value!r}")
        return (value,)

    def at(self, table, experiment, level):
        return True

    def label(self, sweep, step):
        return self.out(sweep, step).name

    def out(self, sweep, step):
        return layout.evaluation_dir(sweep.level_dir(step), self.name)

    def train_dirs(self, sweep, step):
        return []

    def run(self, sweep, step):
        _toy(sweep.level_dir(step), sweep.item(step).get("scale", 1.0))

    def add_arguments(self, p):
        from sslprune.cli import run_args
        run_args(p)
        p.add_argument("--scale", type=float, default=1.0)

    def command(self, args, argv):
        from sslprune.lottery import pick_levels
        for r, level in pick_levels(args.run_dir, args.replicates, args.level):
            print(f"replicate {r} level {level}: {_toy(layout.level_dir(args.run_dir, r, level), args.scale):.4f}")
        return 0


def _toy(level_dir, scale):
    out = layout.evaluation_dir(level_dir, Toy.name)
    if not layout.is_done(out):
        weights = layout.load_model(layout.run_dir(level_dir)).values()
        mean = torch.cat([w.abs().flatten() for w in weights if w.is_floating_point()]).mean()
        layout.save_json(out / layout.DONE, {"mean_abs": scale * float(mean)})
    return layout.load_json(out / layout.DONE)["mean_abs"]


def test_a_new_evaluation_is_its_module_and_one_registry_line(tmp_path, capsys, monkeypatch):
    """The sweep and the CLI take a new evaluation from its registry entry alone: nothing else changes."""
    from sslprune.evaluations import EVALUATIONS
    from sslprune.workers import work
    monkeypatch.setitem(EVALUATIONS, "toy", Toy())   # its registry line
    spec = tmp_path / "sweep.toml"
    spec.write_text(SPEC.format(epochs=1, replicates=1, retrain='["rewind"]').replace('["labels", "rotation"]',
                                                                                     '["rotation"]')
                    + "\n[evaluations.toy]\nscale = 2.0\n")
    # what `sslprune sweep` runs in each worker process, here in this one, where the toy is registered
    assert work(spec, "test") == 1 + 2 * 2
    assert main(["sweep", str(spec), "--status"]) == 0
    assert "5/5 steps done" in capsys.readouterr().out
    (exp,) = [d for d in (tmp_path / "runs").iterdir() if d.is_dir()]
    scaled = [layout.load_json(layout.evaluation_dir(layout.level_dir(exp, 1, level), "toy") / layout.DONE)["mean_abs"]
              for level in (0, 1)]
    assert all(v > 0 for v in scaled)
    # its command, with its own flags (the result above is read back, as a sweep's results are)
    assert main(["eval", "toy", str(exp), "--level", "1"]) == 0
    assert capsys.readouterr().out.strip() == f"replicate 1 level 1: {scaled[1]:.4f}"
    # its spec is checked before anything runs, in one line
    bad = tmp_path / "bad.toml"
    bad.write_text(spec.read_text().replace("scale = 2.0", "scales = 2.0").replace('root = "runs"', 'root = "bad"'))
    assert main(["sweep", str(bad)]) == 2
    assert "evaluations.toy must be a table with an optional scale" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("spec", sorted((Path(__file__).resolve().parents[1] / "studies").glob("*/*.toml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_study_spec_loads(spec):
    """The committed studies are specs a user runs as they are: each one is read and checked whole
    (every experiment valid, every evaluation's table) without running anything."""
    loaded = load_spec(spec)
    assert loaded.experiments


def test_the_paper_study_specs_build_the_presets_experiments():
    """studies/cifar10-paper spells every value out, and its README says a user's `--preset` run is
    the same experiment (same folder name): each spec experiment is its preset's, with the spec's
    dataset, model and task (and rewind.toml's rewind point, which it varies)."""
    from sslprune.config import PRESETS, Experiment
    here = Path(__file__).resolve().parents[1] / "studies" / "cifar10-paper"
    preset_of = {"labels": "cifar10-resnet18-paper", "rotation": "cifar10-resnet18-paper",
                 "exemplar": "cifar10-resnet18-exemplar-paper", "npid": "cifar10-resnet18-npid",
                 "s4l": "cifar10-resnet18-s4l"}
    for spec in sorted(here.glob("*.toml")):
        for exp in load_spec(spec).experiments:
            name = ("cifar10-resnet18-10pct-labels" if exp.task.label_fraction and exp.task.task == "labels"
                    else preset_of[exp.task.task])
            values = {k: v for k, v in PRESETS[name].items() if k not in ("levels", "replicates")}
            varied = {"rewind": exp.prune.rewind} if spec.stem == "rewind" else {}
            built = Experiment.from_flat({**values, "dataset": exp.data.dataset, "model": exp.model.model,
                                          "task": exp.task.task, **varied})
            assert built == exp and built.name() == exp.name(), (spec.name, name)


def test_the_paper_rewind_study_shares_the_1ep_runs():
    """studies/cifar10-paper/rewind.toml's cost (README) counts its 1-epoch lotteries as labels.toml's
    and rotation.toml's own runs: the same experiments, so one folder, trained once."""
    here = Path(__file__).resolve().parents[1] / "studies" / "cifar10-paper"
    own = {e.name() for spec in ("labels", "rotation") for e in load_spec(here / f"{spec}.toml").experiments}
    rewind = load_spec(here / "rewind.toml").experiments
    shared = {e.name() for e in rewind if e.name() in own}
    assert len(rewind) == 8 and shared == {e.name() for e in rewind if e.prune.rewind == "1ep"} and len(shared) == 2


def test_the_cpu_studys_masks_are_all_retrained_under_one_schedule():
    """cifar10-cpu compares re-trained masks across its specs (F1-F3, F8): whatever each arm trains
    with (10% labels: 195 epochs), every mask is re-trained on labels with the same settings."""
    from sslprune.retrain import retrain_settings
    here = Path(__file__).resolve().parents[1] / "studies" / "cifar10-cpu"
    settings = {(spec.name, exp.name()): retrain_settings(exp)
                for spec in sorted(here.glob("*.toml")) for exp in load_spec(spec).experiments}
    assert len(settings) >= 6 and len(set(settings.values())) == 1, settings


def test_imagenet_commands_follow_the_spec_levels(tmp_path):
    """studies/imagenet-paper/commands.py: a lottery line per replicate; with [evaluations] level a
    re-training line per variant and listed level (each runnable once its mask exists), which the
    CLI parses back to those levels."""
    import importlib.util

    from sslprune.cli import parser
    here = Path(__file__).resolve().parents[1] / "studies" / "imagenet-paper"
    spec = importlib.util.spec_from_file_location("imagenet_commands", here / "commands.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    toml = tmp_path / "labels.toml"
    toml.write_text((here / "labels.toml").read_text().replace("[evaluations]", "[evaluations]\nlevel = [0, 10, 30]"))
    lines = mod.commands(toml, [])
    retrain = [line.split()[1:] for line in lines if line.split()[1] == "retrain"]
    assert sum(line.split()[1] == "lottery" for line in lines) == 3
    assert len(retrain) == 3 * 3 * 3                          # 3 replicates x 3 variants x 3 levels
    assert sorted({parser().parse_args(r).level[0] for r in retrain}) == [0, 10, 30]
