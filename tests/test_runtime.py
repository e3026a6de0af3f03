"""Runtime choices (memory format, precision): same results to tolerance, never silently mixed."""
import pytest
import torch

from sslprune import layout
from sslprune.errors import UserError
from sslprune.lottery import build
from sslprune.pruning import prunable, prune_iteratively
from sslprune.runtime import Runtime
from sslprune.train import train

from .conftest import killed_at_evaluation, tiny_experiment


def test_defaults_never_pick_bf16_on_cpu():
    rt = Runtime("cpu").resolved()
    assert rt.precision == "fp32" and rt.channels_last
    assert Runtime("cpu", channels_last=False).resolved().memory_format == torch.contiguous_format
    with pytest.raises(UserError, match="unknown --precision"):
        Runtime(precision="fp16").resolved()


def _run(data, out, runtime, epochs=2):
    exp = tiny_experiment(epochs=epochs)
    backbone, task = build(exp, data, seed=0)
    mask = prune_iteratively(backbone, 2, 0.2)
    res = train(backbone, task, data, exp.train, exp.data, mask, out, seed=3, runtime=runtime, progress=False)
    return backbone, mask, res


def test_channels_last_matches_contiguous_and_keeps_the_mask(tmp_path, data):
    """NHWC changes the order of float sums only: same weights to float tolerance, same zeros."""
    nchw, mask, a = _run(data, tmp_path / "nchw", Runtime(channels_last=False))
    nhwc, _, b = _run(data, tmp_path / "nhwc", Runtime(channels_last=True))
    w = prunable(nhwc)
    assert w["features.0.weight"].is_contiguous(memory_format=torch.channels_last)
    for n, v in prunable(nchw).items():
        assert torch.allclose(v, w[n], atol=1e-4, rtol=1e-3), n
        assert (w[n][~mask[n]] == 0).all()
    assert abs(a["train_loss"] - b["train_loss"]) < 1e-3


def test_bf16_autocast_runs_and_a_run_resumes_only_under_its_runtime(tmp_path, data, monkeypatch):
    _, mask, res = _run(data, tmp_path / "bf16", Runtime(precision="bf16"), epochs=1)
    assert res["train_loss"] == res["train_loss"]          # finite, trained under autocast
    # killed after epoch 1's checkpoint: resuming in fp32 would mix two precisions in one run
    killed_at_evaluation(monkeypatch, 2, lambda: _run(data, tmp_path / "mixed", Runtime(precision="bf16")))
    assert (tmp_path / "mixed" / layout.CHECKPOINT).exists()
    with pytest.raises(UserError, match="different configuration or runtime"):
        _run(data, tmp_path / "mixed", Runtime(precision="fp32"))
