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


def test_demo_workers_side_by_side_compute_what_one_computes(tmp_path, monkeypatch):
    """Two worker processes take independent steps at once; every file they write is bitwise the
    one a single worker writes (one thread each: a step's result does not depend on its neighbours)."""
    import hashlib
    monkeypatch.setitem(config.PRESETS, "demo", {**config.PRESETS["demo"], "epochs": 1})

    def files(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*.safetensors"))}

    one = run_demo(tmp_path / "one", replicates=2, levels=1, progress=False, tasks=("labels", "rotation"), workers=1)
    two = run_demo(tmp_path / "two", replicates=2, levels=1, progress=False, tasks=("labels", "rotation"), workers=2)
    a, b = files(tmp_path / "one" / "runs"), files(tmp_path / "two" / "runs")
    assert len(a) > 20 and a == b
    assert one["csv"].read_text() == two["csv"].read_text()
    ledger = (tmp_path / "two" / "runs" / "sweep_ledger.jsonl").read_text()
    assert '"worker": "local-0"' in ledger and '"worker": "local-1"' in ledger      # both took steps
