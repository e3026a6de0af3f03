import csv

from sslprune import config
from sslprune.demo import run_demo


def test_demo_runs_whole_study_in_miniature(tmp_path, monkeypatch):
    monkeypatch.setitem(config.PRESETS, "demo", {**config.PRESETS["demo"], "epochs": 1})
    paths = run_demo(tmp_path, replicates=2, levels=2, progress=False)
    rows = list(csv.DictReader(open(paths["csv"])))
    curves = {(r["objective"], r["reset"], r["eval"]) for r in rows}
    assert curves == {("labels", "rewind", "task"), ("rotation", "rewind", "task"),
                      ("labels", "rewind", "retrain"), ("labels", "reinit", "retrain"),
                      ("labels", "random", "retrain"), ("rotation", "rewind", "retrain"),
                      ("rotation", "reinit", "retrain"), ("npid", "rewind", "task"),
                      ("npid", "rewind", "retrain"), ("npid", "reinit", "retrain")}
    assert {r["replicate"] for r in rows} == {"1", "2"} and {r["level"] for r in rows} == {"0", "1", "2"}
    before = paths["csv"].read_text()
    again = run_demo(tmp_path, replicates=2, levels=2, progress=False)  # resumes: nothing to redo
    assert again["csv"].read_text() == before


def test_demo_takes_any_objectives(tmp_path, monkeypatch):
    monkeypatch.setitem(config.PRESETS, "demo", {**config.PRESETS["demo"], "epochs": 1})
    paths = run_demo(tmp_path, replicates=1, levels=1, progress=False, tasks=("exemplar", "s4l"))
    rows = list(csv.DictReader(open(paths["csv"])))
    assert {r["objective"] for r in rows} == {"exemplar", "s4l 10% of images"}
    assert "exemplar: positive retrieval accuracy" in paths["md"].read_text()
