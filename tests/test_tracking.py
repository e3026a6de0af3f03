"""Runs you can watch: a line per epoch and per level without a terminal; optional tracking backends."""
from sslprune import tracking
from sslprune.cli import main
from sslprune.lottery import prepare, run_replicate
from sslprune.runtime import Runtime

from .conftest import tiny_experiment

FLAGS = ["lottery", "--dataset", "digits", "--model", "convnet", "--task", "rotation", "--optimizer", "adam",
         "--lr", "2e-3", "--batch-size", "64", "--epochs", "2", "--levels", "1"]


def test_a_run_without_a_terminal_logs_a_line_per_epoch_and_level(tmp_path, capsys):
    assert main([*FLAGS, "--root", str(tmp_path / "runs")]) == 0       # stderr is captured: not a terminal
    err = capsys.readouterr().err.splitlines()
    epochs = [line for line in err if " epoch " in line]
    assert [line.split(":")[0] for line in epochs] == [
        "replicate_1/level_0/train epoch 1/2", "replicate_1/level_0/train epoch 2/2",
        "replicate_1/level_1/train epoch 1/2", "replicate_1/level_1/train epoch 2/2"]
    assert all("loss " in line and "test rotation accuracy " in line and line.endswith(" s)") for line in epochs)
    levels = [line for line in err if " of the weights" in line]
    assert levels[0].startswith("replicate_1/level_0: 100.00% of the weights, test rotation accuracy")
    assert levels[1].startswith("replicate_1/level_1: 80.00% of the weights")
    assert main([*FLAGS, "--root", str(tmp_path / "quiet"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""                                 # --quiet: nothing


class Fake:
    module = extra = "json"      # importable: the backend counts as installed
    logged: list = []

    def __init__(self, run):
        self.name = tracking.layout.run_name(run)

    def log(self, metrics, step):
        Fake.logged.append((self.name, step, metrics["test_acc"]))

    def close(self):
        Fake.logged.append((self.name, "closed", None))


def test_a_tracking_backend_gets_every_epoch_of_every_run(tmp_path, data, monkeypatch):
    monkeypatch.setitem(tracking.BACKENDS, "fake", Fake)
    exp = tiny_experiment(task="rotation", epochs=2)
    exp_dir = prepare(exp, tmp_path, data, None, ["t"])
    run_replicate(exp, exp_dir, data, 1, 1, runtime=Runtime(track="fake"), progress=False)
    assert [(n, s) for n, s, _ in Fake.logged] == [
        ("replicate_1/level_0/train", 1), ("replicate_1/level_0/train", 2), ("replicate_1/level_0/train", "closed"),
        ("replicate_1/level_1/train", 1), ("replicate_1/level_1/train", 2), ("replicate_1/level_1/train", "closed")]
    assert all(0 <= acc <= 1 for _, s, acc in Fake.logged if s != "closed")


def test_a_missing_tracking_backend_is_refused_before_anything_is_written(tmp_path, capsys):
    assert main([*FLAGS, "--root", str(tmp_path / "runs"), "--track", "mlflow"]) == 2
    assert "--track mlflow needs mlflow: pip install 'sslprune[mlflow]'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
