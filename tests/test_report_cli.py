import csv
import subprocess
import sys

import pytest

from sslprune import layout
from sslprune.cli import main
from sslprune.config import Experiment
from sslprune.lottery import prepare, run_replicate
from sslprune.report import summarise, write_report
from sslprune.retrain import retrain

from .conftest import tiny_experiment


def test_report_columns_remaining_and_stats(tmp_path, data):
    dirs = []
    for task in ("labels", "rotation"):
        exp = tiny_experiment(task=task, epochs=1)
        d = prepare(exp, tmp_path / "runs", data, None, ["t"])
        for r in (1, 2):
            run_replicate(exp, d, data, r, 2, progress=False)
            for level in range(3):
                retrain(exp, d, data, r, level, "reinit", progress=False)
        dirs.append(d)
    paths = write_report(dirs, tmp_path / "report")
    rows = list(csv.DictReader(open(paths["csv"])))
    assert list(rows[0]) == ["experiment", "objective", "reset", "replicate", "level", "remaining",
                            "remaining_network", "eval", "metric", "value", "granularity", "params", "macs",
                            "macs_ratio", "speedup_torch_cpu_b1", "speedup_torch_cpu_b64", "speedup_onnxruntime_b1",
                            "speedup_onnxruntime_b64", "speedup_torch_cuda_b1", "speedup_torch_cuda_b64"]
    assert {r["granularity"] for r in rows} == {"weight"} and {r["macs"] for r in rows} == {""}  # no eval cost
    assert {(r["objective"], r["reset"], r["eval"]) for r in rows} == {
        ("labels", "rewind", "task"), ("rotation", "rewind", "task"),
        ("labels", "reinit", "retrain"), ("rotation", "reinit", "retrain")}
    for r in rows:
        assert abs(float(r["remaining"]) - 0.8 ** int(r["level"])) < 1e-3
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert "± " in paths["md"].read_text()


def test_summary_mean_and_standard_error():
    rows = [dict(experiment="e1", eval="retrain", objective="labels", reset="rewind", level=1,
                 remaining=0.8, metric="test_acc", value=v) for v in (0.5, 0.7, 0.9)]
    (s,) = summarise(rows)
    assert s["mean"] == pytest.approx(0.7) and s["se"] == pytest.approx(0.2 / 3 ** 0.5) and s["n"] == 3
    # two experiments with the same objective are two curves, never pooled as replicates
    other = [{**r, "experiment": "e2", "value": 0.1} for r in rows]
    a, b = summarise(rows + other)
    assert {a["objective"], b["objective"]} == {"e1", "e2"} and a["n"] == b["n"] == 3


def test_preset_and_flags_and_golden_hashes():
    from sslprune.cli import parser, resolve
    exp, run = resolve(parser().parse_args(["lottery", "--preset", "cifar10-resnet18-paper", "--epochs", "3"]))
    assert exp.train.epochs == 3 and exp.train.lr == 1e-3 and exp.train.milestones == (80, 120)
    assert exp.train.optimizer == "adam" and exp.prune.rewind == "1ep" and run["levels"] == 30
    # Run names are a contract: changing them orphans users' results. Pinned on purpose.
    assert Experiment().hash() == "44136fa355b3"
    assert tiny_experiment().name() == "labels_convnet_digits_" + tiny_experiment().hash()
    assert Experiment.from_flat({"dataset": "cifar10", "model": "resnet20", "task": "labels"}).hash() == GOLDEN


GOLDEN = "dc100d129ad6"


@pytest.mark.parametrize("argv,needle", [
    (["lottery", "--preset", "demo", "--model", "resnet99"], "unknown model 'resnet99'"),
    (["lottery", "--preset", "demo", "--task", "jigsaw"], "unknown task 'jigsaw'"),
    (["lottery", "--preset", "demo"], "--task is required; choose one of: exemplar, labels, npid, rotation, s4l"),
    (["lottery", "--preset", "demo", "--task", "labels", "--fraction", "1.5"], "--fraction must be in (0, 1)"),
    (["lottery", "--dataset", "digits", "--model", "convnet", "--task", "labels"], "--lr must be > 0"),
    (["lottery", "--preset", "demo", "--task", "labels", "--dataset", "imagefolder"], "--data-root is required"),
    (["lottery", "--preset", "demo", "--task", "labels", "--rewind", "3x"], "--rewind must look like"),
    (["lottery", "--preset", "demo", "--task", "labels", "--crop-pad", "-1"], "--crop-pad must be >= 0"),
    (["lottery", "--preset", "demo", "--task", "labels", "--crop-pad", "8"], "--crop-pad 8 is not smaller"),
    (["lottery", "--preset", "demo", "--task", "labels", "--device", "tpu9"], "unknown --device"),
    (["lottery", "--preset", "demo", "--task", "labels", "--dataset", "cifar10", "--data-root", __file__],
     "is a file"),
    (["retrain", "/nonexistent/run"], "not an experiment directory"),
    (["report", "/nonexistent/run"], "holds no experiment"),
])
def test_cli_errors_are_one_line_exit_2(argv, needle, tmp_path, capsys):
    assert main([*argv, *(["--root", str(tmp_path)] if argv[0] == "lottery" else [])]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


def test_cli_process_exit_code_and_preset_run(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "sslprune", "lottery", "--preset", "demo", "--task", "x",
                          "--root", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    usage = subprocess.run([sys.executable, "-m", "sslprune", "lottery", "--levels", "x"],
                           capture_output=True, text=True)
    assert usage.returncode == 2
    ok = subprocess.run([sys.executable, "-m", "sslprune", "lottery", "--preset", "demo", "--task", "labels", "--epochs", "1",
                         "--levels", "1", "--replicates", "1", "--train-per-class", "10", "--quiet",
                         "--root", str(tmp_path)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    exp_dir = ok.stdout.strip().splitlines()[-1]
    cfg = layout.load_json(f"{exp_dir}/{layout.CONFIG}")
    assert cfg["config"]["train"]["epochs"] == 1 and cfg["commands"][0][0] == "lottery"
    assert {"git", "versions", "hash"} <= set(cfg)
    r = subprocess.run([sys.executable, "-m", "sslprune", "retrain", exp_dir, "--reset", "random",
                        "--quiet"], capture_output=True, text=True)  # default: every trained level
    assert r.returncode == 0, r.stderr
    assert all(layout.is_done(f"{exp_dir}/replicate_1/level_{L}/retrain_random") for L in (0, 1))
    assert layout.load_json(f"{exp_dir}/{layout.CONFIG}")["commands"][-1][:2] == ["retrain", exp_dir]
    density = layout.load_json(f"{exp_dir}/replicate_1/level_1/{layout.DENSITY}")["layers"]
    assert density[-1]["layer"] == "total" and abs(density[-1]["density"] - 0.8) < 1e-3


def test_replicate_ranges():
    from sslprune.cli import parser, resolve
    def reps(*flags):
        return resolve(parser().parse_args(["lottery", "--preset", "demo", "--task", "labels", *flags]))[1]["replicates"]
    assert reps() == [1, 2] and reps("--replicates", "3") == [1, 2, 3]
    assert reps("--replicates", "3-4") == [3, 4] and reps("--replicates", "2,5") == [2, 5]
