"""Sweeps: independent workers share one run root; a worker killed mid-step loses nothing."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sslprune import layout
from sslprune.cli import main
from sslprune.sweep import load_spec
from sslprune.workers import status

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
    # a re-run finds everything done and starts nothing
    n = len(ledger)
    assert main(["sweep", str(spec)]) == 0
    assert len(_ledger(root)) == n


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
    n = len(_ledger(tmp_path / "runs"))
    assert main(["sweep", str(spec)]) == 0 and len(_ledger(tmp_path / "runs")) == n   # nothing re-run


@pytest.mark.parametrize("evaluations, message", [
    ('[evaluations]\nprobes = []\n', "unknown evaluation(s) ['probes']"),
    ('[[evaluations.probe]]\ndata_root = "x"\n', "evaluations.probe needs a dataset"),
    ('[[evaluations.finetune]]\ndataset = "digits"\nepoch = 3\n', "unknown key(s) ['epoch']"),
    ('[[evaluations.finetune]]\ndataset = "digits"\nlr = -1.0\n', "--lr must be > 0"),
    ('[evaluations.stability]\nlevels = [1]\n', "evaluations.stability: unknown key 'levels'"),
    ('[evaluations.stability]\nbn = "running"\n', "evaluations.stability.bn must be one of recompute, keep"),
    ('[evaluations.stability]\npoints = "3"\n', "evaluations.stability.points must be int"),
])
def test_bad_evaluations_fail_in_one_line(tmp_path, capsys, evaluations, message):
    bad = tmp_path / "bad.toml"
    bad.write_text(f'levels = 1\n[base]\npreset = "demo"\ntask = "rotation"\n{evaluations}')
    assert main(["sweep", str(bad)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
