"""The on-disk contract: every path a run writes is one layout names, and layout parses what it made."""
from pathlib import Path

import pytest

from sslprune import layout
from sslprune.cli import main
from sslprune.errors import UserError


def test_every_path_of_a_finished_run_is_one_layout_names(tmp_path, capsys):
    root = tmp_path / "runs"
    flags = ["lottery", "--dataset", "digits", "--model", "convnet", "--task", "rotation", "--optimizer", "adam",
             "--lr", "2e-3", "--batch-size", "64", "--epochs", "1", "--levels", "1", "--rewind", "1ep", "--quiet",
             "--root", str(root)]
    assert main(flags) == 0
    exp = next(root.iterdir())
    assert main(["retrain", str(exp), "--variants", "rewind,random", "--quiet"]) == 0
    assert main(["eval", "probe", str(exp), "--level", "1", "--quiet"]) == 0
    assert main(["eval", "stability", str(exp), "--level", "0", "--points", "3", "--quiet"]) == 0
    assert main(["eval", "cost", str(exp), "--repeats", "1", "--no-onnx"]) == 0
    paths = sorted(exp.rglob("*"))
    described = {p.relative_to(exp).as_posix(): layout.describe(p, exp) for p in paths}
    assert described["replicate_1/level_1/retrain_random/mask.safetensors"] == \
        "replicate 1, level 1: retrain (random), mask.safetensors"
    assert described["replicate_1/level_0/stability/copy_2/done.json"] == "replicate 1, level 0: stability, done.json"
    assert any(k.startswith("replicate_1/level_1/probe_digits_") for k in described)
    # and what layout made, it parses back
    assert layout.replicates(exp) == [1] and layout.trained_levels(exp) == [(1, 0), (1, 1)]
    kinds = {e.kind: e for e in layout.evaluations(layout.level_dir(exp, 1, 1))}
    assert set(kinds) == {"train", "retrain", "probe"}
    assert layout.probe_dir(layout.level_dir(exp, 1, 1), kinds["probe"].data, kinds["probe"].digest) == kinds["probe"].path
    assert layout.locate(layout.run_dir(layout.level_dir(exp, 1, 0)) / layout.MODEL) == (exp, 1, 0)
    for stray in (exp / "notes.txt", exp / "replicate_1" / "level_1" / "old_run" / "done.json",
                  exp / "replicate_x", exp / "replicate_1" / "level_1" / "train" / "extra.bin"):
        with pytest.raises(UserError, match="not a path"):
            layout.describe(stray, exp)


def test_no_module_but_layout_spells_a_run_folder_name():
    """Folder names are made and parsed in layout.py alone (grep, so a new one cannot creep in)."""
    import re
    # a name's prefix in a string ('level_', f"retrain_{reset}"; not the config field "retrain_as"), or a
    # run folder joined onto a path
    pattern = re.compile(r"""["'](?:replicate_|level_|retrain_(?!as["'])|probe_|finetune_|copy_)|/\s*["'](?:train|stability)["']""")
    offenders = []
    for path in sorted(Path(layout.__file__).parent.rglob("*.py")):
        if path.name == "layout.py" or path.parent.name == "data":   # data/: a dataset's own train/ folder
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if pattern.search(code):
                offenders.append(f"{path.name}:{i}: {line.strip()}")
    assert offenders == []


def test_a_level_moved_aside_is_not_a_level(tmp_path):
    """The fix the errors give ('move level_2 away'): level_2.diverged is left alone by every reader."""
    exp = tmp_path / "exp"
    for d in ("replicate_1/level_0/train", "replicate_1/level_1.diverged/train", "replicate_1.old/level_0"):
        (exp / d).mkdir(parents=True)
    assert layout.replicates(exp) == [1]
    assert [(r, lv) for r, lv, _ in layout.levels(exp)] == [(1, 0)]

