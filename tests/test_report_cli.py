import csv
import subprocess
import sys
from pathlib import Path

import pytest

from sslprune import layout
from sslprune.cli import main
from sslprune.config import Experiment
from sslprune.lottery import prepare, run_replicate
from sslprune.report import collect, cost_markdown, markdown, plot, plot_cost, summarise, write_report
from sslprune.retrain import retrain

from .conftest import digits_lottery, tiny_experiment


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
    provenance = [line for line in paths["md"].read_text().splitlines() if line.startswith(("| labels_", "| rotation_"))]
    assert len(provenance) == 2 and all(line.endswith("| - |") for line in provenance)   # no sweep: no compute
    md = paths["md"].read_text()
    assert "± " in md
    # every plot also as SVG beside it
    pngs = sorted((tmp_path / "report").glob("*.png"))
    assert pngs and all(p.with_suffix(".svg").read_text().lstrip().startswith("<?xml") for p in pngs)
    assert paths["svg"] == paths["png"].with_suffix(".svg")
    # the header says what produced the numbers: model, data, schedule, the code's revision
    header = md.split("## Experiments")[1].split("\n## ")[0]
    git = layout.load_json(dirs[0] / layout.CONFIG)["git"]
    for needle in ("convnet", "tiny (digits)", "adam lr 0.003", "epochs 1", "20% per level, rewind to 1it",
                   git[:12], dirs[0].name, dirs[1].name):
        assert needle in header, needle
    # two replicates everywhere: n once per column header, never in a cell
    table = [line for line in md.split("## Masks re-trained on labels")[1].split("\n## ")[0].splitlines() if line.startswith("|")]
    assert "labels / reinit (n=2)" in table[0] and not any("(n=" in line for line in table[2:])
    # one y-label per measure: class accuracy and rotation accuracy never share an axis
    fig = plot(summarise(collect(dirs)), tmp_path / "again.png")
    ylabels = [ax.get_ylabel() for ax in fig.axes if ax.get_visible()]
    assert len(ylabels) == len(set(ylabels)) == 3
    assert any("rotation accuracy" in y for y in ylabels) and any("re-trained on labels" in y for y in ylabels)


def test_summary_mean_and_standard_error():
    rows = [dict(experiment="e1", eval="retrain", objective="labels", reset="rewind", level=1,
                 remaining=0.8, metric="test_acc", value=v) for v in (0.5, 0.7, 0.9)]
    (s,) = summarise(rows)
    assert s["mean"] == pytest.approx(0.7) and s["se"] == pytest.approx(0.2 / 3 ** 0.5) and s["n"] == 3
    # two experiments with the same objective are two curves, never pooled as replicates
    other = [{**r, "experiment": "e2", "value": 0.1} for r in rows]
    a, b = summarise(rows + other)
    assert {a["objective"], b["objective"]} == {"e1", "e2"} and a["n"] == b["n"] == 3


def _rows(levels, replicates=(1,), ev="retrain", measure="class accuracy", objective="labels"):
    return [dict(experiment="e1", eval=ev, objective=objective, reset="rewind", level=level,
                 remaining=0.8 ** level, metric="test_acc", measure=measure, value=0.5 + 0.01 * r)
            for level in range(levels) for r in replicates]


def test_density_axis_has_a_readable_tick_at_every_level(tmp_path):
    fig = plot(summarise(_rows(16)), tmp_path / "p.png")
    ax = fig.axes[0]
    shown = [t.get_text() for t in ax.get_xticklabels() if t.get_visible()]
    assert shown == ["100", "80", "64", "51", "41", "33", "26", "21", "17", "13", "11",
                     "8.6", "6.9", "5.5", "4.4", "3.5"]
    assert ax.get_xscale() == "log" and not ax.xaxis.get_minorticklabels()
    assert (tmp_path / "p.svg").exists()
    # too many levels to label them all: labels are thinned so that none overlap
    ax = plot(summarise(_rows(60)), tmp_path / "many.png").axes[0]
    labels = [t for t in ax.get_xticklabels() if t.get_visible()]
    assert labels[0].get_text() == "100" and 10 < len(labels) < 60
    boxes = [t.get_window_extent() for t in labels]
    assert not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:]))


def test_one_replicate_shows_values_without_spread(tmp_path):
    summary = summarise(_rows(3))
    md = markdown(summary)
    assert "±" not in md and "nan" not in md and "(one replicate)" in md
    assert "labels / rewind (n=1)" in md and "| 0.5100 |" in md
    assert "±" not in plot(summary, tmp_path / "p.png").axes[0].get_ylabel()
    plot(summary, tmp_path / "again.png")  # an unchanged report rewrites the same SVG bytes
    assert (tmp_path / "p.svg").read_bytes() == (tmp_path / "again.svg").read_bytes()


def test_replicates_per_column_once_or_per_cell_when_they_vary():
    md = markdown(summarise(_rows(3, replicates=(1, 2, 3))))
    assert "labels / rewind (n=3)" in md and "| 0.5200 ± 0.0058 |" in md
    # level 2 has one replicate only (a run still going): the header says n varies, cells say theirs
    rows = [r for r in _rows(3, replicates=(1, 2, 3)) if r["level"] < 2 or r["value"] < 0.515]
    md = markdown(summarise(rows))
    assert "n varies, 1-3" in md and "0.5200 ± 0.0058 (n=3)" in md and "| 0.5100 (n=1) |" in md


def test_each_measure_has_its_own_table_and_axis(tmp_path):
    rows = _rows(2, ev="task") + _rows(2, ev="task", measure="rotation accuracy", objective="rotation")
    summary = summarise(rows)
    md = markdown(summary)
    assert "own task during pruning: test class accuracy" in md and "own task during pruning: test rotation accuracy" in md
    assert [ax.get_ylabel() for ax in plot(summary, tmp_path / "p.png").axes] == [
        "test class accuracy", "test rotation accuracy"]


def test_a_curve_keeps_its_colour_across_panels_and_its_line_says_how_weights_were_set(tmp_path):
    rows = [{**r, "reset": reset} for reset in ("rewind", "reinit", "random") for r in _rows(3)]
    rows += _rows(3, ev="task", objective="rotation") + _rows(3, ev="task")   # 'labels' sorts first in both
    fig = plot(summarise(rows), tmp_path / "p.png")
    style = {(ax.get_title()[:10], c.get_label()): (c.lines[0].get_color(), c.lines[0].get_linestyle())
             for ax in fig.axes for c in ax.containers}   # errorbar: the label is the container's
    assert style[("Masks re-t", "labels / reinit")][1] == "--" and style[("Masks re-t", "random pruning (labels run)")][1] == ":"
    colour = {label: c for (_, label), (c, _) in style.items() if label.endswith("/ rewind")}
    assert colour["labels / rewind"] != colour["rotation / rewind"]
    assert style[("Each objec", "labels / rewind")][0] == style[("Masks re-t", "labels / rewind")][0]
    # ten curves in one panel: the legend goes below the axes, where it hides none of them
    many = [{**r, "objective": f"o{i}", "experiment": f"e{i}"} for i in range(10) for r in _rows(3)]
    ax = plot(summarise(many), tmp_path / "many.png").axes[0]
    assert len(ax.get_legend().get_texts()) == 10
    assert ax.get_legend().get_window_extent().y1 <= ax.get_window_extent().y0


def test_cost_plot_and_table_say_what_they_measure(tmp_path):
    costs = [dict(eval=ev, curve=f"{obj} / rewind", level=level, n=1, granularity="channel", measure=measure,
                  remaining=0.8 ** level, acc=0.5, params=1000, macs_ratio=0.7 ** level,
                  speedup={"torch_cpu_b64": 1.2 ** level})
             for level in range(4) for ev, obj, measure in [("task", "rotation", "rotation accuracy"),
                                                             ("retrain", "rotation", "class accuracy")]]
    table = cost_markdown(costs)
    assert "| value (n=1) |" in table and "| rotation accuracy | 0.5000 |" in table and "(n=1) |" not in table.split("\n", 5)[5]
    fig = plot_cost(costs, tmp_path / "cost.png")
    assert "each curve's metric in the legend" in " ".join(fig.axes[0].get_ylabel().split())
    assert any("rotation accuracy" in t.get_text() for t in fig.axes[0].get_legend().get_texts())
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["100", "70", "49", "34"]
    assert (tmp_path / "cost.svg").exists()


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
    (["lottery", "--dataset", "digits", "--model", "convnet", "--task", "labels"], "no --lr, --batch-size, --epochs (unset or 0): set them above 0"),
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
    for flag in ("--preset", "--replicates"):   # argparse's own errors: one line too, not the usage block
        bad = subprocess.run([sys.executable, "-m", "sslprune", "lottery", flag, "-2"], capture_output=True, text=True)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "(see 'sslprune lottery --help')" in bad.stderr
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
    r = subprocess.run([sys.executable, "-m", "sslprune", "retrain", exp_dir, "--variants", "random",
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


def test_one_grammar_level_picks_levels_creates_and_lists_take_commas(tmp_path, capsys):
    exp = digits_lottery(tmp_path / "runs", 1)
    capsys.readouterr()
    assert main(["retrain", str(exp), "--levels", "1", "--quiet"]) == 2
    assert "'retrain' picks existing levels with --level, e.g. --level 1" in capsys.readouterr().err
    assert main(["export", str(exp), "--level", "1", "--levels", "1"]) == 2   # export takes one level
    assert "'export' picks existing levels with --level" in capsys.readouterr().err
    assert main(["retrain", str(exp), "--level", "1", "--variants", "rewind,random", "--quiet"]) == 0
    assert {e.reset for e in layout.evaluations(layout.level_dir(exp, 1, 1)) if e.kind == "retrain"} == {"rewind", "random"}
    with pytest.raises(SystemExit) as e:                                  # argparse: one line, exit 2
        main(["retrain", str(exp), "--variants", "rewind,sometimes"])
    assert e.value.code == 2 and "comma-separated list of rewind, reinit" in capsys.readouterr().err
    # --reset is lottery's one value (how each level starts); retrain's list is --variants
    assert main(["retrain", str(exp), "--reset", "rewind,random", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "retrain takes --variants rewind,random" in err and "--reset is lottery's" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("sslprune ")


def test_a_run_from_a_config_file_is_the_run_from_its_flags(tmp_path, capsys):
    flags = ["--preset", "demo", "--task", "rotation", "--epochs", "1", "--levels", "0", "--replicates", "1"]
    assert main(["lottery", *flags, "--print-config"]) == 0
    printed = capsys.readouterr().out
    name = printed.strip().splitlines()[-1].removeprefix("# experiment: ")
    config = tmp_path / "run.toml"
    config.write_text(printed)
    assert main(["lottery", "--config", str(config), "--print-config"]) == 0
    assert capsys.readouterr().out == printed                               # the same experiment, every field
    assert not (tmp_path / "runs").exists() and not Path("runs").exists()   # printing runs nothing
    assert main(["lottery", "--config", str(config), "--lr", "0.01", "--print-config"]) == 0
    assert name not in capsys.readouterr().out                               # flags override the file
    config.write_text('preset = "demo"\nbatchsize = 3\n')
    assert main(["lottery", "--config", str(config)]) == 2
    assert "'batchsize' is no configuration field" in capsys.readouterr().err
    config.write_text('preset = "demo"\nlevels = 1.5\n')                    # refused before anything is written
    assert main(["lottery", "--config", str(config), "--root", str(tmp_path / "r")]) == 2
    assert "levels must be a whole number >= 0, got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_an_experiment_is_reported_once_and_namesakes_are_refused(tmp_path, data):
    """A folder given twice (directly and through its root) counts once; the same settings trained
    under two roots (the data root is not in the name) are refused rather than pooled."""
    from sslprune.errors import UserError
    exp = tiny_experiment(epochs=1)
    d = prepare(exp, tmp_path / "a", data, None, ["t"])
    for r in (1, 2):
        run_replicate(exp, d, data, r, 1, progress=False)
    once = write_report([d], tmp_path / "once")["md"].read_text()
    assert write_report([d, tmp_path / "a" / d.name, d], tmp_path / "twice")["md"].read_text() == once
    other = prepare(exp, tmp_path / "b", data, None, ["t"])
    run_replicate(exp, other, data, 1, 0, progress=False)
    with pytest.raises(UserError, match="two experiments named"):
        write_report([d, other], tmp_path / "both")


def test_curves_of_other_densities_at_one_level_say_their_own():
    """A channel run (or another --fraction) beside a weight run: level 1 is not one density."""
    rows = _rows(2, objective="weight") + [{**r, "objective": "channel", "remaining": 0.5 ** r["level"]}
                                           for r in _rows(2)]
    md = markdown(summarise(rows))
    assert "| 1 | see cells | 0.5100 at 50.00% | 0.5100 at 80.00% |" in md
    assert "| 0 | 100.00% | 0.5100 | 0.5100 |" in md


def test_report_warns_when_masks_were_retrained_under_other_settings(tmp_path, data, capsys):
    dirs = []
    for task, lr in (("labels", 3e-3), ("rotation", 1e-3)):
        exp = tiny_experiment(task=task, epochs=1, lr=lr)
        d = prepare(exp, tmp_path / "runs", data, None, ["t"])
        run_replicate(exp, d, data, 1, 0, progress=False)
        retrain(exp, d, data, 1, 0, "reinit", progress=False)
        dirs.append(d)
    from sslprune.report import mixed_retraining
    (line,) = mixed_retraining(dirs)
    assert "adam lr 0.003" in line and "adam lr 0.001" in line and dirs[0].name in line
    assert mixed_retraining(dirs[:1]) == []


def test_retrain_as_judges_every_objectives_masks_under_one_schedule(tmp_path, data, capsys):
    """--retrain-as P: masks re-trained with preset P's schedule (here demo's: Adam 2e-3, 12 epochs,
    cosine, batch 64) whatever the run's own; the report's warning goes when the runs share it; an
    unknown preset is refused. (The default changes no experiment's name: the golden hashes above.)"""
    import json

    from sslprune.errors import UserError
    from sslprune.report import mixed_retraining
    dirs = []
    for task, lr in (("labels", 3e-3), ("rotation", 1e-3)):
        exp = tiny_experiment(task=task, epochs=1, lr=lr, retrain_as="demo")
        d = prepare(exp, tmp_path / "runs", data, None, ["t"])
        run_replicate(exp, d, data, 1, 0, progress=False)
        assert retrain(exp, d, data, 1, 0, "reinit", progress=False)["epochs"] == 12
        log = [json.loads(line) for line in
               (layout.run_dir(layout.level_dir(d, 1, 0), "reinit") / layout.LOG).read_text().splitlines()]
        assert len(log) == 12 and log[0]["lr"] == 2e-3 and log[-1]["lr"] < 1e-4   # demo's cosine, not lr
        assert log[0]["step"] == 1                                                 # 96 images at batch 64
        dirs.append(d)
    assert mixed_retraining(dirs) == []
    with pytest.raises(UserError, match="unknown retrain-as 'nope'"):
        tiny_experiment(retrain_as="nope").validate()


def test_the_report_says_where_each_mask_keeps_its_weights(tmp_path, data):
    """layer_density.csv: a row per (mask, layer) of every level, the lottery's mask and the random
    baseline's, each count read from the mask itself and summing to the level's remaining weights;
    summary.md and layer_density.png show them."""
    import math

    from sslprune import report_layers

    exp = tiny_experiment(epochs=1)
    d = prepare(exp, tmp_path / "runs", data, None, ["t"])
    run_replicate(exp, d, data, 1, 2, progress=False)
    retrain(exp, d, data, 1, 2, "random", progress=False)
    paths = write_report([d], tmp_path / "report")
    rows = list(csv.DictReader(open(paths["layers_csv"])))
    assert list(rows[0]) == report_layers.COLUMNS
    # a random mask where its re-training finished, as in results.csv (levels 0 and 1's were drawn on
    # the way to level 2's: nested, on disk, not re-trained)
    assert {(r["mask"], r["level"]) for r in rows} == {("lottery", "0"), ("lottery", "1"), ("lottery", "2"), ("random", "2")}
    for mask, level in {(r["mask"], r["level"]) for r in rows}:
        ldir = layout.level_dir(d, 1, int(level))
        truth = layout.load_mask(ldir / layout.MASK if mask == "lottery" else layout.random_mask(ldir, mask))
        mine = [r for r in rows if (r["mask"], r["level"]) == (mask, level)]
        assert {r["layer"]: int(r["kept"]) for r in mine} == {n: int(m.sum()) for n, m in truth.items()}
        kept, total = sum(int(r["kept"]) for r in mine), sum(int(r["total"]) for r in mine)
        assert math.isclose(kept / total, float(mine[0]["remaining"]), rel_tol=1e-9)
        assert math.isclose(kept / total, 0.8 ** int(level), abs_tol=1e-3)
    md = paths["md"].read_text()
    assert "## Where the masks keep their weights" in md and "random mask: level 2" in md
    assert paths["layers_png"].read_bytes()[:4] == b"\x89PNG" and paths["layers_png"].with_suffix(".svg").exists()


def test_the_layer_table_turns_to_fit_the_layers():
    """A row per curve when there are at least as many curves as layers (a study of the 3-layer
    convnet), a row per layer when there are more layers than curves (a ResNet-50 has 53)."""
    from sslprune.report_layers import markdown

    def summary(layers, curves):
        return {(f"obj{c}", "lottery", 4): {"remaining": 0.41, "n": 2, "layers": {f"l{i}": 0.5 for i in range(layers)},
                                           "total": {f"l{i}": 100 for i in range(layers)}} for c in range(curves)}
    wide = [line for line in markdown(summary(3, 5)).splitlines() if line.startswith("|")]
    assert wide[0] == "| mask | l0 (100) | l1 (100) | l2 (100) |" and len(wide) == 2 + 5
    tall = [line for line in markdown(summary(6, 2)).splitlines() if line.startswith("|")]
    assert tall[0].startswith("| layer | weights | obj0, lottery mask: level 4, 41% (n=2)") and len(tall) == 2 + 6
    assert tall[2] == "| l0 | 100 | 50% | 50% |"
