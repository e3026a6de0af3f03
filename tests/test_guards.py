"""Nothing silently wrong: divergence stops a run, nonsense input is refused before anything is written."""
import json
import math

import pytest
import torch

from sslprune import layout
from sslprune.cli import main
from sslprune.errors import UserError
from sslprune.pruning import dense_mask, prune
from sslprune.models import build_model

DIGITS = ["lottery", "--dataset", "digits", "--model", "convnet", "--task", "labels", "--batch-size", "64",
          "--epochs", "3", "--levels", "2", "--replicates", "1", "--quiet"]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sslprune: error: "), err   # one line, no traceback
    return err


def test_a_diverged_run_stops_keeps_its_last_good_checkpoint_and_publishes_nothing(tmp_path, capsys):
    root = tmp_path / "runs"
    # lr 1e6 diverges in epoch 1 (the reproduction, exit 0 and NaN results before)
    assert main([*DIGITS, "--optimizer", "sgd", "--lr", "1e6", "--root", str(root)]) == 2
    err = _one_line(capsys)
    assert "training diverged in replicate_1/level_0/train, epoch 1: the loss became non-finite at step" in err
    assert "lower --lr" in err
    exp_dir = next(root.iterdir())
    level0 = layout.level_dir(exp_dir, 1, 0)
    assert not (level0 / "train" / layout.DONE).exists() and not (level0 / "train" / layout.MODEL).exists()
    assert not layout.level_dir(exp_dir, 1, 1).exists()                     # nothing pruned from NaN
    assert main(["report", str(root), "--out", str(tmp_path / "rep")]) == 0
    assert "nan" not in (tmp_path / "rep" / "results.csv").read_text().lower()


def test_divergence_after_a_good_epoch_keeps_that_epoch(tmp_path, capsys, monkeypatch):
    from sslprune import train as train_mod
    real = train_mod.check_finite

    def second_epoch_diverges(out, epoch, bad_step, loss, params):
        if epoch == 2 and params:  # the training check of epoch 2 sees a NaN loss
            loss = math.nan
        return real(out, epoch, bad_step, loss, params)

    monkeypatch.setattr(train_mod, "check_finite", second_epoch_diverges)
    root = tmp_path / "runs"
    assert main([*DIGITS, "--optimizer", "adam", "--lr", "2e-3", "--root", str(root)]) == 2
    assert "epoch 2" in _one_line(capsys)
    ckpt = layout.load_checkpoint(layout.level_dir(next(root.iterdir()), 1, 0) / "train" / layout.CHECKPOINT)
    assert ckpt["epoch"] == 1                                                # the last good epoch, kept


def test_pruning_refuses_non_finite_scores():
    bb = build_model("convnet")
    scores = {n: torch.rand(m.shape) for n, m in dense_mask(bb).items()}
    scores["features.0.weight"][0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="non-finite scores"):
        prune(scores, dense_mask(bb), 0.2)


@pytest.mark.parametrize("flags,message", [
    (["--optimizer", "adam", "--lr", "nan"], "--lr must be a finite number"),
    (["--optimizer", "adam", "--lr", "inf"], "--lr must be a finite number"),
    (["--optimizer", "adam", "--lr", "1e-3", "--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["--optimizer", "sgd", "--lr", "0.1", "--momentum", "5"], "--momentum must be in [0, 1)"),
    (["--optimizer", "adam", "--lr", "1e-3", "--momentum", "0.9"], "--momentum applies to --optimizer sgd or lars only"),
    (["--optimizer", "adam", "--lr", "1e-3", "--task", "exemplar", "--margin", "5"], "--margin must be in (0, 2]"),
    (["--optimizer", "adam", "--lr", "1e-3", "--batch-size", "100000"], "exceeds the 1437 training images"),
    (["--optimizer", "adam", "--lr", "1e-3", "--task", "npid", "--nce-negatives", "64", "--knn", "100000"],
     "--knn 100000 exceeds the 1437 rows"),
    (["--optimizer", "adam", "--lr", "1e-3", "--data-root", "somewhere"], "reads no --data-root"),
    (["--optimizer", "adam", "--lr", "1e-3", "--schedule", "step"], "--schedule step needs --milestones"),
    (["--optimizer", "adam", "--lr", "1e-3", "--levels", "100000"], "less than one; pass at most --levels 51"),
    (["--optimizer", "adam", "--lr", "1e-3", "--rewind", "100ep"], "--rewind 100ep lies past the end of training"),
    (["--optimizer", "adam", "--lr", "1e-3", "--rewind", "5000it"], "--rewind 5000it lies past the end"),
    (["--optimizer", "adam", "--lr", "1e-3", "--accumulate", "3"], "--accumulate must be >= 1 and divide --batch-size"),
    (["--optimizer", "adam", "--lr", "1e-3", "--accumulate", "0"], "--accumulate must be >= 1"),
    (["--optimizer", "adam", "--lr", "1e-3", "--task", "exemplar", "--accumulate", "2"],
     "--task exemplar computes its loss across the batch or keeps state"),
])
def test_nonsense_flags_are_refused_before_anything_is_written(tmp_path, capsys, flags, message):
    assert main([*DIGITS, *flags, "--root", str(tmp_path / "runs")]) == 2
    assert message in _one_line(capsys)
    assert not (tmp_path / "runs").exists()


def test_a_one_class_imagefolder_is_refused(tmp_path, capsys):
    from .test_stream import write_tree
    tree = write_tree(tmp_path / "tree", classes=("only",))
    flags = ["lottery", "--dataset", "imagefolder", "--data-root", str(tree), "--image-size", "16", "--model",
             "convnet", "--task", "rotation", "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "4",
             "--epochs", "1", "--root", str(tmp_path / "runs"), "--quiet"]
    assert main(flags) == 2
    assert "has 1 class: nothing to tell apart" in _one_line(capsys)
    assert not (tmp_path / "runs").exists()


def test_sparsity_refuses_a_nan_threshold(tmp_path, capsys):
    assert main(["sparsity", str(tmp_path), "--threshold", "nan"]) == 2
    assert "--threshold must be >= 0 and finite" in _one_line(capsys)


@pytest.mark.parametrize("spec,message", [
    ('levels = "three"', "levels must be a whole number >= 0"),
    ("levels = -1", "levels must be a whole number >= 0"),
    ("replicates = 0", "replicates must be a whole number >= 1"),
    ('[base]\nlr = "abc"', "--lr takes a number, got 'abc'"),
    ("[base]\nepochs = 2.5", "--epochs takes a whole number, got 2.5"),
])
def test_sweep_specs_with_wrong_types_are_one_line_errors(tmp_path, capsys, spec, message):
    top, base = ("", spec.removeprefix("[base]\n")) if spec.startswith("[base]") else (spec, "")
    text = f'{top}\n[base]\npreset = "demo"\n{base}\n[grid]\ntask = ["labels"]\n'
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    assert main(["sweep", str(path)]) == 2
    assert message in _one_line(capsys)


def test_config_types_are_checked():
    from .conftest import tiny_experiment
    with pytest.raises(UserError, match="--milestones takes a list of whole numbers"):
        tiny_experiment(milestones=("a",)).validate()


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b"{}", b"[1, 2]", b'{"config": [1]}',
                                     b'{"config": {"train": 5}}'])
def test_a_damaged_config_json_is_one_line_in_every_command(tmp_path, capsys, content):
    root = tmp_path / "runs"
    flags = [*DIGITS, "--optimizer", "adam", "--lr", "2e-3", "--epochs", "1", "--levels", "0", "--root", str(root)]
    assert main(flags) == 0
    exp_dir = next(root.iterdir())
    capsys.readouterr()
    (exp_dir / layout.CONFIG).write_bytes(content)
    for argv in (flags, ["retrain", str(exp_dir), "--quiet"], ["report", str(exp_dir), "--out", str(tmp_path / "r")],
                 ["eval", "probe", str(exp_dir)], ["export", str(exp_dir), "--level", "0", "--out", str(tmp_path / "e")]):
        assert main(argv) == 2, argv
        err = _one_line(capsys)
        assert "config" in err and ("damaged" in err or "not valid JSON" in err), err


_COUNTING = """
import sys
from sslprune import layout, lottery
from sslprune.cli import main

real = lottery.train

def counting(backbone, task, data, cfg, aug, mask, out, *a, **k):
    if not layout.is_done(out):
        with open(sys.argv[1], "a") as f:   # O_APPEND: one whole line per write, from either process
            f.write(str(out) + "\\n")
    return real(backbone, task, data, cfg, aug, mask, out, *a, **k)

lottery.train = counting
sys.exit(main(sys.argv[2:]))
"""


def test_two_identical_lotteries_at_once_compute_each_step_once(tmp_path):
    """Two commands on one run root, as two processes (threads would share torch's global RNG, which
    seeds the initial weights, so they cannot stand in for two commands). Each level is trained once,
    and both end with the files one command alone writes."""
    import subprocess
    import sys

    flags = [*DIGITS, "--optimizer", "adam", "--lr", "2e-3", "--epochs", "1", "--levels", "2", "--replicates", "2"]
    trained = tmp_path / "trained.txt"
    procs = [subprocess.Popen([sys.executable, "-c", _COUNTING, str(trained), *flags, "--root", str(tmp_path / "a")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    lines = trained.read_text().splitlines()
    assert len(lines) == len(set(lines)) == 6, lines                   # 2 replicates x 3 levels, once each
    assert main([*flags, "--root", str(tmp_path / "b")]) == 0          # one command alone
    a, b = next((tmp_path / "a").iterdir()), next((tmp_path / "b").iterdir())
    files = sorted(p.relative_to(b) for p in b.rglob("*.safetensors"))
    assert files == sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert [f for f in files if (a / f).read_bytes() != (b / f).read_bytes()] == []
    assert len(layout.load_json(a / layout.CONFIG)["commands"]) == 2   # neither command line lost
    assert not list(a.rglob("*.tmp"))


def test_temporaries_of_a_killed_writer_are_cleaned_on_the_next_run(tmp_path):
    flags = [*DIGITS, "--optimizer", "adam", "--lr", "2e-3", "--epochs", "1", "--root", str(tmp_path / "runs")]
    assert main([*flags, "--levels", "0"]) == 0
    exp_dir = next((tmp_path / "runs").iterdir())
    left = [layout.level_dir(exp_dir, 1, 1) / ".mask.safetensors.abc.tmp",
            layout.level_dir(exp_dir, 1, 1) / "train" / ".checkpoint.pt.xyz.tmp"]
    for p in left:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
    assert main([*flags, "--levels", "1"]) == 0
    assert not any(p.exists() for p in left)


def test_every_output_file_gets_one_mode(tmp_path):
    import os
    import stat
    assert main([*DIGITS, "--optimizer", "adam", "--lr", "2e-3", "--epochs", "1", "--levels", "0",
                 "--root", str(tmp_path / "runs")]) == 0
    modes = {stat.S_IMODE(os.stat(p).st_mode) for p in (tmp_path / "runs").rglob("*") if p.is_file()
             and not p.name.endswith(".lock")}
    umask = os.umask(0)
    os.umask(umask)
    assert modes == {0o666 & ~umask}


def test_report_names_unfinished_levels(tmp_path, capsys):
    flags = [*DIGITS, "--optimizer", "adam", "--lr", "2e-3", "--epochs", "1", "--levels", "1",
             "--root", str(tmp_path / "runs")]
    assert main(flags) == 0
    exp_dir = next((tmp_path / "runs").iterdir())
    (layout.level_dir(exp_dir, 1, 1) / "train" / layout.DONE).unlink()
    capsys.readouterr()
    assert main(["report", str(exp_dir), "--out", str(tmp_path / "rep")]) == 0
    err = capsys.readouterr().err
    assert f"warning: {exp_dir.name}: 1 unfinished, left out of the report: replicate_1/level_1/train" in err


def _flip(path, offset_from_end=40, n=20):
    raw = bytearray(path.read_bytes())
    for i in range(n):  # data bytes at the end, not the header: the file still parses
        raw[-offset_from_end + i] ^= 0x55
    path.write_bytes(bytes(raw))


def test_damaged_finished_files_are_detected_and_recomputed_exactly(tmp_path, capsys):
    flags = [*DIGITS, "--optimizer", "adam", "--lr", "2e-3", "--epochs", "1", "--levels", "2"]
    assert main([*flags, "--root", str(tmp_path / "a")]) == 0
    assert main([*flags, "--root", str(tmp_path / "b")]) == 0                 # an untouched copy
    exp_dir = next((tmp_path / "a").iterdir())
    reference = next((tmp_path / "b").iterdir())
    capsys.readouterr()
    mask = layout.level_dir(exp_dir, 1, 1) / layout.MASK
    _flip(mask)
    for argv in (["retrain", str(exp_dir), "--variants", "rewind", "--quiet"], ["report", str(exp_dir), "--out",
                 str(tmp_path / "rep")], ["export", str(exp_dir), "--level", "1", "--out", str(tmp_path / "e")]):
        assert main(argv) == 2
        err = _one_line(capsys)
        assert f"{mask} is truncated or corrupt: its sha256 differs" in err and "move it away" in err
    mask.rename(mask.with_suffix(".bad"))                                      # what the message says to do
    assert main([*flags, "--root", str(tmp_path / "a")]) == 0
    assert mask.read_bytes() == (layout.level_dir(reference, 1, 1) / layout.MASK).read_bytes()

    model = layout.level_dir(exp_dir, 1, 2) / "train" / layout.MODEL
    _flip(model)
    assert main([*flags, "--root", str(tmp_path / "a"), "--levels", "3"]) == 2    # level 3's mask reads level 2
    assert f"{model} is truncated or corrupt" in _one_line(capsys)
    rewind = layout.replicate_dir(exp_dir, 1) / layout.REWIND
    _flip(rewind)
    assert main(["retrain", str(exp_dir), "--variants", "rewind", "--level", "2", "--quiet"]) == 2
    assert f"{rewind} is truncated or corrupt" in _one_line(capsys)
    done = layout.level_dir(exp_dir, 1, 1) / "train" / layout.DONE   # a seal that is no seal: refused, not skipped
    done.write_text(json.dumps({**json.loads(done.read_text()), "files": {"model.safetensors": 5}}))
    assert main(["export", str(exp_dir), "--level", "1", "--out", str(tmp_path / "e2")]) == 2
    assert "the seal of" in _one_line(capsys) and not (tmp_path / "e2").exists()


def test_a_truncated_done_json_is_not_done(tmp_path, capsys):
    flags = [*DIGITS, "--optimizer", "adam", "--lr", "2e-3", "--epochs", "1", "--levels", "1",
             "--root", str(tmp_path / "runs")]
    assert main(flags) == 0
    done = layout.level_dir(next((tmp_path / "runs").iterdir()), 1, 1) / "train" / layout.DONE
    done.write_bytes(done.read_bytes()[:30])
    capsys.readouterr()
    assert main(flags) == 2
    err = _one_line(capsys)
    assert f"{done} is not valid JSON" in err and "move it away" in err


def test_an_experiment_keeps_one_runtime(tmp_path, capsys):
    flags = [*DIGITS, "--optimizer", "adam", "--lr", "2e-3", "--epochs", "1", "--levels", "0",
             "--root", str(tmp_path / "runs")]
    assert main(flags) == 0
    capsys.readouterr()
    assert main([*flags[:-4], "--levels", "1", "--root", str(tmp_path / "runs"), "--precision", "bf16"]) == 2
    err = _one_line(capsys)
    assert "trains under cpu, fp32, channels_last, not cpu, bf16, channels_last" in err
    assert not layout.level_dir(next((tmp_path / "runs").iterdir()), 1, 1).exists()


def test_paths_the_system_refuses_are_one_line_errors(tmp_path, capsys):
    """A file where a folder goes (--root), a folder where a file goes (--config, a spec), a
    plain number for a list, no SLURM: one line and exit 2, never a traceback."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    flags = [*DIGITS, "--optimizer", "adam", "--lr", "1e-3", "--epochs", "1", "--levels", "0"]
    for argv, message in (([*flags, "--root", str(tmp_path / "afile")], "Not a directory"),
                          ([*flags, "--root", str(tmp_path / "r"), "--config", str(tmp_path / "adir")], "Is a directory"),
                          (["sweep", str(tmp_path / "adir")], "Is a directory")):
        assert main(argv) == 2, argv
        assert message in _one_line(capsys)
    spec = tmp_path / "spec.toml"
    spec.write_text('levels = 0\n[base]\npreset = "demo"\ntask = "labels"\nmilestones = 3\n')
    assert main(["sweep", str(spec)]) == 2
    assert "--milestones takes a list of whole numbers" in _one_line(capsys)
    spec.write_text('levels = 0\n[base]\npreset = "demo"\ntask = "labels"\n')
    assert main(["sweep", str(spec), "--submit", "slurm"]) == 2   # no SLURM on a test machine
    assert "needs SLURM's sbatch and srun" in _one_line(capsys)


def test_a_checkpoint_of_something_else_is_refused(tmp_path, capsys):
    flags = [*DIGITS, "--optimizer", "adam", "--lr", "1e-3", "--epochs", "1", "--levels", "0", "--root", str(tmp_path)]
    assert main([*flags, "--print-config"]) == 0
    name = capsys.readouterr().out.strip().splitlines()[-1].split(": ")[-1]
    train_dir = layout.level_dir(tmp_path / name, 1, 0) / "train"
    train_dir.mkdir(parents=True)
    torch.save({"epoch": 5}, train_dir / layout.CHECKPOINT)
    assert main(flags) == 2
    assert "is no sslprune checkpoint (no fingerprint)" in _one_line(capsys)


def test_levels_and_replicates_asked_for_are_never_skipped_in_silence(tmp_path, capsys):
    from .conftest import digits_lottery
    exp_dir = digits_lottery(tmp_path / "runs", 1)
    capsys.readouterr()
    for argv, message in ((["retrain", str(exp_dir), "--level", "7"], "has no mask for replicate 1 level 7"),
                          (["retrain", str(exp_dir), "--level", "0,9"], "has no mask for replicate 1 level 9"),
                          (["retrain", str(exp_dir), "--replicates", "3"], "has no replicate 2, 3 (it has 1)"),
                          (["eval", "probe", str(exp_dir), "--level", "0,9"], "has no trained level 9 (trained: 0, 1)"),
                          (["eval", "stability", str(exp_dir), "--replicates", "2-2"], "has no trained replicate 2"),
                          (["eval", "cost", str(exp_dir), "--level", "5", "--no-onnx"], "has no masked level 5 (masked: 0, 1)")):
        assert main([*argv, *(["--quiet"] if argv[1] != "cost" else [])]) == 2, argv
        assert message in _one_line(capsys)
    assert not (exp_dir / "replicate_1" / "level_7").exists() and not (exp_dir / "replicate_1" / "level_9").exists()
    with pytest.raises(SystemExit):   # a reversed range is no range
        main(["retrain", str(exp_dir), "--level", "3-1"])
    assert "(ascending)" in capsys.readouterr().err


def test_a_level_one_replicate_lacks_is_named_not_dropped(tmp_path, monkeypatch):
    """A lottery on its way: replicate 2 has not reached level 1. Asking level 1 names that gap
    instead of evaluating replicate 1 alone and calling it the level's mean."""
    from sslprune.lottery import pick_levels
    have = [(1, 0), (1, 1), (2, 0)]
    with pytest.raises(UserError, match=r"no trained level 1 in replicate 2; ask for --replicates 1-1,"):
        pick_levels(tmp_path, None, [1], available=have)
    with pytest.raises(UserError, match=r"level 1 in replicate 2"):
        pick_levels(tmp_path, [1, 2], [0, 1], available=have)
    assert pick_levels(tmp_path, [1], [1], available=have) == [(1, 1)]
    # the advice names only replicates that have every level asked for
    with pytest.raises(UserError, match=r"level 1 in replicate 3; ask for --replicates 2-2,"):
        pick_levels(tmp_path, [2, 3], [1], available=[(1, 0), (2, 0), (2, 1), (3, 0)])
    # a replicate with no finished level yet (its level 0 training) is named too
    (tmp_path / "replicate_1").mkdir(), (tmp_path / "replicate_2").mkdir()
    monkeypatch.setattr(layout, "trained_levels", lambda d: [(1, 0)])
    with pytest.raises(UserError, match=r"no trained level 0 in replicate 2; ask for --replicates 1-1,"):
        pick_levels(tmp_path, None, [0])
    assert pick_levels(tmp_path, None, [0], available=have) == [(1, 0), (2, 0)]
    assert pick_levels(tmp_path, None, None, available=have) == have


def test_a_level_that_empties_a_layer_says_so(tmp_path, capsys):
    """Global magnitude pruning can take a whole layer: the lottery warns at every such level
    (here 90% a level on 100 digits: the last conv empties by level 2 or 3)."""
    assert main(["lottery", "--dataset", "digits", "--model", "convnet", "--task", "labels", "--optimizer", "adam",
                 "--lr", "1e-3", "--batch-size", "32", "--epochs", "1", "--train-per-class", "10", "--test-per-class",
                 "5", "--fraction", "0.9", "--levels", "3", "--quiet", "--root", str(tmp_path)]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warned and all("no weight left in" in line and "disconnected" in line for line in warned)
    levels = [int(line.split(" level ")[1].split()[0]) for line in warned]
    level = levels[0]
    assert levels == list(range(level, 4))                                  # at that level and every deeper one
    exp_dir = next(tmp_path.iterdir())
    mask = layout.load_mask(layout.level_dir(exp_dir, 1, level) / layout.MASK)
    assert any(not m.any() for m in mask.values())                       # the warning is true
    before = layout.load_mask(layout.level_dir(exp_dir, 1, level - 1) / layout.MASK)
    assert all(m.any() for m in before.values())                          # and said at the first such level
