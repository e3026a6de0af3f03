"""Export: standalone networks that compute what the masked level computes, and their cost."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from sslprune import channels, cost, export, layout
from sslprune.cli import main
from sslprune.errors import UserError
from sslprune.lottery import prepare, run_replicate
from sslprune.models import build_model
from sslprune.pruning import apply_mask
from sslprune.retrain import retrain

from .conftest import tiny_experiment
from .test_channels import FAMILIES, _randomised


@pytest.fixture(scope="module")
def channel_run(tmp_path_factory):
    from .conftest import tiny_dataset
    data = tiny_dataset()
    root = tmp_path_factory.mktemp("runs")
    exp = tiny_experiment(task="rotation", granularity="channel", epochs=1)
    exp_dir = prepare(exp, root, data, None, ["t"])
    run_replicate(exp, exp_dir, data, 1, 2, progress=False)
    retrain(exp, exp_dir, data, 1, 2, "rewind", progress=False)
    return exp_dir, data


def _masked_output(exp_dir, level, x, reset=None):
    net, info = export.level_network(exp_dir, 1, level, reset)
    with torch.no_grad():
        return net(x)


def test_export_is_compact_standalone_and_onnx_agrees(channel_run, tmp_path):
    exp_dir, data = channel_run
    info = export.export(exp_dir, 1, 2, tmp_path / "small", ("safetensors", "onnx"))
    assert info["cost"]["params"] < info["dense_cost"]["params"] and info["cost"]["macs"] < info["dense_cost"]["macs"]
    net = export.load_exported(tmp_path / "small")              # no run directory needed
    x = data.test.images[:16].float() / 255                    # 0-1 images, as documented
    torch.testing.assert_close(net(x), _masked_output(exp_dir, 2, x), rtol=1e-4, atol=1e-5)
    session = export.onnx_session(tmp_path / "small" / layout.EXPORT_ONNX)
    got = session.run(None, {"images": x.numpy()})[0]         # dynamic batch: 16, exported with 2
    np.testing.assert_allclose(got, net(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    saved = json.loads((tmp_path / "small" / layout.EXPORT_INFO).read_text())
    assert saved["source"]["level"] == 2 and saved["granularity"] == "channel" and saved["head"] is None
    keys = layout.load_tensors(tmp_path / "small" / layout.EXPORT_MODEL)
    assert "features.0.weight" in keys and keys["features.0.weight"].shape[0] < 32   # channels gone


def test_retrained_level_exports_a_classifier(channel_run, tmp_path):
    exp_dir, data = channel_run
    export.export(exp_dir, 1, 2, tmp_path / "clf", reset="rewind")
    net = export.load_exported(tmp_path / "clf")
    x = data.test.images[:8].float() / 255
    logits = net(x)
    assert logits.shape == (8, data.num_classes)
    torch.testing.assert_close(logits, _masked_output(exp_dir, 2, x, "rewind"), rtol=1e-4, atol=1e-5)
    assert "fc.weight" in layout.load_tensors(tmp_path / "clf" / layout.EXPORT_MODEL)


def test_an_exported_classifier_scores_what_its_training_recorded(channel_run, tmp_path):
    """End to end, not through level_network: the exported re-trained network, run on the raw test
    images (0-1, its own normalisation), has the test accuracy its re-training wrote in done.json."""
    exp_dir, data = channel_run
    export.export(exp_dir, 1, 2, tmp_path / "clf", reset="rewind")
    with torch.no_grad():
        pred = export.load_exported(tmp_path / "clf")(data.test.images.float() / 255).argmax(1)
    recorded = layout.load_json(layout.run_dir(layout.level_dir(exp_dir, 1, 2), "rewind") / layout.DONE)["test_acc"]
    assert abs(float((pred == data.test.labels).float().mean()) - recorded) <= 1 / len(pred)


def test_weight_granularity_exports_the_masked_dense_network(tmp_path, data):
    exp = tiny_experiment(epochs=1)
    exp_dir = prepare(exp, tmp_path, data, None, ["t"])
    run_replicate(exp, exp_dir, data, 1, 1, progress=False)
    info = export.export(exp_dir, 1, 1, tmp_path / "w")
    assert "no speed-up" in info["note"] and info["cost"]["macs"] == info["dense_cost"]["macs"]
    assert info["cost"]["params_nonzero"] < info["dense_cost"]["params_nonzero"]
    x = data.test.images[:8].float() / 255
    torch.testing.assert_close(export.load_exported(tmp_path / "w")(x), _masked_output(exp_dir, 1, x))
    # end to end, as for channels: the exported re-trained classifier scores what its training recorded
    recorded = retrain(exp, exp_dir, data, 1, 1, "reinit", progress=False)["test_acc"]
    export.export(exp_dir, 1, 1, tmp_path / "wclf", reset="reinit")
    with torch.no_grad():
        pred = export.load_exported(tmp_path / "wclf")(data.test.images.float() / 255).argmax(1)
    assert abs(float((pred == data.test.labels).float().mean()) - recorded) <= 1 / len(pred)


@pytest.mark.parametrize("name,size", FAMILIES)
def test_every_family_round_trips_through_an_export_folder(name, size, tmp_path):
    bb = _randomised(name)
    groups = channels.channel_groups(bb)
    alive = [torch.ones(g.size, dtype=torch.bool) for g in groups]
    alive = channels.prune_channels(groups, alive, channels.channel_scores(groups, bb.state_dict(), "l2"), 0.4)
    apply_mask(bb, channels.channel_mask(bb, groups, alive))
    head = nn.Linear(bb.feature_dim, 7)
    small, small_head = channels.compact(bb, groups, alive, head)
    net = export.Standalone(small, small_head, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]).eval()
    info = {"model": name, "granularity": "channel", "source": {"test": name},
            "input": {"shape": [3, size, size], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]},
            "head": {"prefix": "fc", "classes": 7}}
    export.write_export(net, info, tmp_path / name)
    loaded = export.load_exported(tmp_path / name)
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
        torch.testing.assert_close(loaded(x), export.Standalone(bb, head, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]).eval()(x),
                                   rtol=1e-4, atol=1e-5)


def test_macs_match_an_analytic_count():
    # convnet on 32x32: conv 3->32 (stride 1), 32->64 and 64->128 (stride 2), 3x3 kernels
    analytic = 32 * 3 * 9 * 32 * 32 + 64 * 32 * 9 * 16 * 16 + 128 * 64 * 9 * 8 * 8
    assert cost.count(build_model("convnet"), (3, 32, 32))["macs"] == analytic
    # every conv of a ResNet-20 and a compact ResNet-50, counted from their output sizes by hooks
    for net, size in [(build_model("resnet20"), 32), (_compact("resnet50"), 64)]:
        macs = []
        hooks = [m.register_forward_hook(lambda m, i, o: macs.append(
            m.out_channels * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] * o.shape[2] * o.shape[3]))
            for m in net.modules() if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            net(torch.zeros(1, 3, size, size))
        for h in hooks:
            h.remove()
        assert cost.count(net, (3, size, size))["macs"] == sum(macs) > 0


def _compact(name):
    bb = _randomised(name)
    groups = channels.channel_groups(bb)
    alive = channels.prune_channels(groups, [torch.ones(g.size, dtype=torch.bool) for g in groups],
                                    channels.channel_scores(groups, bb.state_dict(), "l1"), 0.5)
    return channels.compact(bb, groups, alive)[0]


def test_eval_cost_writes_cost_beside_each_mask_and_the_report_reads_it(channel_run, tmp_path, capsys):
    exp_dir, _ = channel_run
    assert main(["eval", "cost", str(exp_dir), "--repeats", "2", "--level", "0,2"]) == 0
    c0 = layout.load_json(layout.level_dir(exp_dir, 1, 0) / layout.COST)
    c2 = layout.load_json(layout.level_dir(exp_dir, 1, 2) / layout.COST)
    assert c0["macs_ratio"] == 1.0 and c2["macs_ratio"] < 0.9
    assert set(c2["speedup"]) >= {"torch_cpu_b1", "torch_cpu_b64", "onnxruntime_b1", "onnxruntime_b64"}
    assert all(v > 0 for v in c2["speedup"].values())
    assert main(["report", str(exp_dir), "--out", str(tmp_path / "rep")]) == 0
    csv = (tmp_path / "rep" / "results.csv").read_text().splitlines()
    assert "macs_ratio" in csv[0] and "speedup_onnxruntime_b64" in csv[0]
    assert "Cost of the pruned networks" in (tmp_path / "rep" / "summary.md").read_text()
    assert (tmp_path / "rep" / "accuracy_vs_cost.png").exists()


def test_bad_exports_are_one_line_errors_and_write_nothing(channel_run, tmp_path, monkeypatch, capsys):
    exp_dir, _ = channel_run
    assert main(["export", str(exp_dir), "--level", "7", "--out", str(tmp_path / "x")]) == 2
    assert "not trained" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["export", str(exp_dir), "--level", "1", "--retrain", "reinit", "--out", str(tmp_path / "x")]) == 2
    assert "sslprune retrain" in capsys.readouterr().err
    import builtins
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("onnx") else real_import(name, *a, **k))
    assert main(["export", str(exp_dir), "--level", "1", "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert "pip install 'sslprune[export]'" in capsys.readouterr().err and not (tmp_path / "x").exists()
    monkeypatch.setattr(builtins, "__import__", real_import)
    # a damaged file is refused when read
    export.export(exp_dir, 1, 1, tmp_path / "ok")
    path = tmp_path / "ok" / layout.EXPORT_MODEL
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="does not match the sha256"):
        export.load_exported(tmp_path / "ok")
    with pytest.raises(UserError, match="another network"):
        export.export(exp_dir, 1, 2, tmp_path / "ok")
    # a run's own folder (its model.safetensors) or a file is no --out: refused, nothing replaced
    train_dir = layout.run_dir(layout.level_dir(exp_dir, 1, 0))
    sealed = (train_dir / layout.MODEL).read_bytes()
    assert main(["export", str(exp_dir), "--level", "1", "--out", str(train_dir)]) == 2
    assert "holds files that are no sslprune export (done.json, log.jsonl)" in capsys.readouterr().err
    assert (train_dir / layout.MODEL).read_bytes() == sealed
    (tmp_path / "cut").mkdir()   # an export killed before its export.json: the same command redoes it
    (tmp_path / "cut" / layout.EXPORT_MODEL).write_bytes(b"half")
    export.export(exp_dir, 1, 1, tmp_path / "cut")
    assert (tmp_path / "cut" / layout.EXPORT_INFO).exists()
    # a file that does not compute, read back, what was exported (a buffer lost on the way) is never
    # marked complete: the check runs before export.json
    real_tensors = export.Standalone.tensors
    monkeypatch.setattr(export.Standalone, "tensors", lambda self: {
        k: (v + 1 if k.endswith("running_mean") else v) for k, v in real_tensors(self).items()})
    assert main(["export", str(exp_dir), "--level", "1", "--out", str(tmp_path / "lossy")]) == 2
    assert "read back, differs from the network it was made from" in capsys.readouterr().err
    assert not (tmp_path / "lossy" / layout.EXPORT_INFO).exists()
    monkeypatch.setattr(export.Standalone, "tensors", real_tensors)
    (tmp_path / "afile").write_text("x")
    assert main(["export", str(exp_dir), "--level", "1", "--out", str(tmp_path / "afile")]) == 2
    assert "is a file; pass a folder" in capsys.readouterr().err
    # a weight mask is not whole channels: no compact network from it
    bb = build_model("convnet")
    mask = {n: torch.rand(m.shape) > 0.5 for n, m in channels.channel_mask(bb, [], []).items()}
    with pytest.raises(UserError, match="single weights"):
        channels.check_mask_is_channels(channels.channel_groups(bb), mask, bb)
