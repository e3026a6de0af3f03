"""studies/cifar10-cpu/findings.py on synthetic reports whose numbers force known verdicts."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "studies" / "cifar10-cpu" / "findings.py"


def _load():
    spec = importlib.util.spec_from_file_location("cifar10_findings", SCRIPT)  # studies/ is no package
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


F = _load()
E = F.study_experiments(F.specs())
# per-replicate offsets: each has mean 0, so the paired differences' means are exact
NOISE = {1: 0.002, 2: -0.001, 3: -0.001}
NOISE2 = {1: -0.001, 2: 0.002, 3: -0.001}


def _row(exp, objective, reset, rep, level, ev, value, metric="test_acc"):
    return dict(experiment=exp, objective=objective, reset=reset, replicate=rep, level=level,
                remaining=0.8 ** level, remaining_network=0.8 ** level, eval=ev, metric=metric, value=value)


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def study_rows(reps=(1, 2, 3), with_rotation=True) -> list[dict]:
    """F1 holds (rotation ≈ labels, both above random, gap widening 0.005 per level), F2 holds
    (+0.03), F3 fails (rotation's boost +0.06), F5 holds on cifar10 and fails on caltech (L10 far
    below L0), F6: labels' masks fine-tuned 0.03 above caltech()'s pruning during transfer,
    rotation's 0.03 below, F8: S4L above rotation, 10% labels below it."""
    rows = []
    lab, rot = E["labels"], E["rotation"]
    for r in reps:
        for lv in range(16):
            reinit = 0.45 - 0.005 * lv + NOISE[r]
            rows += [_row(lab, "labels", "reinit", r, lv, "retrain", reinit),
                     _row(lab, "labels", "rewind", r, lv, "retrain", reinit + 0.03 + NOISE2[r]),
                     _row(lab, "labels", "random", r, lv, "retrain", 0.40 - 0.01 * lv + NOISE2[r]),
                     _row(lab, "labels", "rewind", r, lv, "probe cifar10-images [ab]", 0.5, "test_mean_class_acc"),
                     _row(lab, "labels", "finetune [ef]", r, lv, "transfer caltech101-subset",
                          during(r, lv, "labels") + 0.03, "test_mean_class_acc")]
            if with_rotation:
                rows += [_row(rot, "rotation", "reinit", r, lv, "retrain", reinit + 0.002 + NOISE2[r] / 2),
                         _row(rot, "rotation", "rewind", r, lv, "retrain", reinit + 0.06 + NOISE2[r]),
                         _row(rot, "rotation", "rewind", r, lv, "probe cifar10-images [ab]",
                              {13: 0.38, 14: 0.35, 15: 0.30}.get(lv, 0.40 + 0.005 * (lv > 0)) + NOISE[r], "test_mean_class_acc"),
                         _row(rot, "rotation", "rewind", r, lv, "probe caltech101-subset [cd]",
                              0.40 - 0.01 * lv + NOISE[r], "test_mean_class_acc"),
                         _row(rot, "rotation", "finetune [ef]", r, lv, "transfer caltech101-subset",
                              during(r, lv, "rotation") - 0.03, "test_mean_class_acc")]
            if with_rotation and r <= 2 and lv <= 10:
                rot_rewind = reinit + 0.06 + NOISE2[r]
                rows += [_row(E["s4l 10%"], "s4l 10% of images", "rewind", r, lv, "retrain", rot_rewind + 0.05 + NOISE[r]),
                         _row(E["labels 10%"], "labels 10% of images", "rewind", r, lv, "retrain", rot_rewind - 0.05 + NOISE[r])]
    return rows


def during(r, lv, objective) -> float:
    """caltech()'s pruning during transfer from the network pre-trained by `objective`."""
    return 0.30 - 0.01 * lv + NOISE[r] + {"labels": 0.05, "rotation": -0.05}[objective] + NOISE2[r]


def caltech(tmp: Path, with_runs=True) -> Path:
    """Pre-trained by labels: +0.05 over 'from scratch, rewind 1ep'; by RotNet: -0.05."""
    rows = []
    for r in (1, 2, 3):
        for lv in range(11):
            scratch = 0.30 - 0.01 * lv + NOISE[r]
            rows += [_row("pre_lab", "labels", "pruned during transfer", r, lv, "transfer caltech101-subset",
                          during(r, lv, "labels"), "test_mean_class_acc"),
                     _row("pre_rot", "rotation", "pruned during transfer", r, lv, "transfer caltech101-subset",
                          during(r, lv, "rotation"), "test_mean_class_acc"),
                     _row("scratch_0it", "labels (rewind 0it)", "rewind", r, lv, "task", scratch - 0.02, "test_mean_class_acc")]
            if with_runs:
                rows.append(_row("scratch_1ep", "labels (rewind 1ep)", "rewind", r, lv, "task", scratch, "test_mean_class_acc"))
    _write(tmp / "caltech" / "report" / "results.csv", rows)
    for name, rewind, pre in (("pre_lab", "0it", "src"), ("pre_rot", "0it", "src"), ("scratch_0it", "0it", ""),
                              ("scratch_1ep", "1ep", "")):
        if with_runs:
            (tmp / "caltech" / "runs" / name).mkdir(parents=True)
            (tmp / "caltech" / "runs" / name / "config.json").write_text(
                json.dumps({"config": {"model": {"pretrained": pre}, "prune": {"rewind": rewind}}}))
    return tmp / "caltech" / "report"


def _table(md: str) -> dict[str, str]:
    """{finding: its row's text}, and the verdict is the row's last cell."""
    rows = [line for line in md.splitlines() if line.startswith(("| F", "| Hubens"))]
    return {line.split(" | ")[0].removeprefix("| "): line for line in rows}


def verdicts(md: str) -> dict[str, str]:
    return {k: v.rstrip(" |").rsplit("| ", 1)[-1] for k, v in _table(md).items()}


def test_full_study_gives_the_built_in_verdicts(tmp_path, capsys):
    report = tmp_path / "report"
    _write(report / "results.csv", study_rows())
    _write(report / "natural_sparsity.csv",
           [dict(experiment=E[o], replicate=r, level=0, threshold=t, layer="total", zeros=0, total=100, fraction=v)
            for o, frac in (("labels", 0.8), ("rotation", 0.7)) for r in (1, 2, 3) for t, v in ((1.2e-7, frac), (1e-3, 0.1))])
    _write(report / "stability.csv",
           [dict(experiment=E[("rewind", "labels", p)], objective="labels", replicate=1, level=lv, remaining=0.8 ** lv,
                 rewind=p, rewind_epochs=0, instability=inst, retrained_acc="") for p, inst in (("0it", 0.2), ("1ep", 0.01))
            for lv in (0, 4, 8)])
    out = F.main([str(report), "--caltech", str(caltech(tmp_path))])
    assert capsys.readouterr().out.strip() == str(out) and out == report / "findings.md"
    md = out.read_text()
    assert verdicts(md) == {
        "F1": "reproduced", "F2": "reproduced", "F3": "not reproduced", "F4": "reproduced",
        "F5 (caltech101-subset)": "not reproduced", "F5 (cifar10-images)": "reproduced",
        "F6 (labels)": "reproduced", "F6 (rotation)": "not reproduced",
        "F8 (S4L-rotation, 10% of labels)": "reproduced", "F8 (labels alone, 10% of labels)": "not reproduced",
        "Hubens et al. (pre-trained on CIFAR-10 by labels, rewind to it)": "reproduced",
        "Hubens et al. (pre-trained on CIFAR-10 by rotation, rewind to it)": "not reproduced"}
    row = _table(md)
    # F2 at level 10: +0.03 exactly, s.e. of (0.032, 0.029, 0.029) = 0.001; remaining from the data
    assert "L10: labels/rewind" in row["F2"] and "diff +0.0300 ± 0.0010 (n=3)" in row["F2"]
    assert "L10 (10.7%), L13 (5.5%), L15 (3.5%)" in row["F2"]
    assert "labels: fraction 0.8000 ± 0.0000 (n=3)" in row["F4"] and "1.2e-07" in row["F4"]
    assert "boost rotation +0.0580" in row["F3"] and "excess +0.0280" in row["F3"]
    assert "rewind 1ep" in row["Hubens et al. (pre-trained on CIFAR-10 by labels, rewind to it)"]
    # F6 pairs this study's fine-tuning with the other study's pruning during transfer, at level 10 only
    assert "L10 (10.7%); n = 3" in row["F6 (labels)"] and "diff +0.0300 ± 0.0000 (n=3)" in row["F6 (labels)"]
    assert "L0, the same dense fine-tuning (not judged)" in row["F6 (rotation)"]
    assert "| labels | 0it | 4 | 41.0% | 0.2000 |" in md and "labels L4: earliest stable rewind point 1ep" in md


def test_one_replicate_is_inconclusive(tmp_path):
    report = tmp_path / "report"
    _write(report / "results.csv", study_rows(reps=(1,)))
    md = F.main([str(report)]).read_text()
    v = verdicts(md)
    assert v["F1"] == v["F2"] == v["F3"] == "inconclusive"
    assert "(n=1)" in _table(md)["F1"]
    assert v["Hubens et al."] == v["F6 (labels)"] == "not tested"
    assert "Missing: the caltech-pretrained report (--caltech)" in md


def test_missing_arms_are_not_tested_and_named(tmp_path):
    report = tmp_path / "report"
    _write(report / "results.csv", study_rows(with_rotation=False))
    md = F.main([str(report), "--caltech", str(caltech(tmp_path, with_runs=False))]).read_text()
    v = verdicts(md)
    assert v["F2"] == "reproduced"  # labels alone decide F2
    for name in ("F1", "F3", "F4", "F5 (cifar10-images)", "F8 (S4L-rotation, 10% of labels)"):
        assert v[name] == "not tested", name
    assert f"Missing: {E['rotation']}: retrain reinit" in md
    # no runs beside the caltech report and no 1ep arm: the 0it arm, said so
    assert v["Hubens et al. (pre-trained on CIFAR-10 by labels, rewind to it)"] == "reproduced"
    assert "rewind 0it used" in md
    assert v["F6 (labels)"] == "reproduced" and v["F6 (rotation)"] == "not tested"
    assert f"Missing: {E['rotation']}: transfer caltech101-subset finetune" in md


def test_f3_without_the_labels_arms_is_not_tested(tmp_path):
    """F3's excess is rotation's boost minus labels': without labels' re-trainings it is no verdict."""
    report = tmp_path / "report"
    _write(report / "results.csv", [r for r in study_rows() if not (r["experiment"] == E["labels"]
                                                                     and r["eval"] == "retrain")])
    md = F.main([str(report)]).read_text()
    assert verdicts(md)["F3"] == "not tested" and verdicts(md)["F2"] == "not tested"
    assert f"Missing: {E['labels']}: retrain rewind" in md


def test_report_without_results_fails_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no results.csv"):
        F.main([str(tmp_path)])


def test_levels_and_replicates_left_out_are_named_and_one_replicate_never_reproduces_f4(tmp_path):
    """A comparison takes the levels and replicates both arms have (the rule); those it leaves out
    are said next to the verdict, never dropped in silence."""
    report = tmp_path / "report"
    rows = [r for r in study_rows() if not (r["experiment"] == E["labels"] and r["reset"] == "rewind"
                                            and r["eval"] == "retrain" and (r["level"] == 15 or r["replicate"] == 3))]
    _write(report / "results.csv", rows)
    _write(report / "natural_sparsity.csv",
           [dict(experiment=E[o], replicate=1, level=0, threshold=1.2e-7, layer="total", zeros=0, total=100, fraction=0.8)
            for o in ("labels", "rotation")])
    md = F.main([str(report)]).read_text()
    f2 = md.split("**F2: ")[1].split("\n")[0]
    assert "Not compared: L10 labels/reinit replicate(s) [3] (unpaired)" in f2
    assert "L15 of labels/rewind vs labels/reinit (an arm has no replicate there)" in f2
    assert "(n=2)" in _table(md)["F2"]
    assert verdicts(md)["F4"] == "inconclusive"   # 80% zeros, but from one replicate
