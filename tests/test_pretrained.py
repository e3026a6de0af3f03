"""Pre-trained start (Hubens et al.): level 0 fine-tunes given backbone weights with a fresh head."""
import pytest
import torch

from sslprune import layout
from sslprune.errors import UserError
from sslprune.lottery import prepare, run_replicate
from sslprune.models import build_model, load_pretrained

from .conftest import tiny_experiment


def test_level_0_starts_from_a_pretrained_backbone_with_a_fresh_head(tmp_path, data):
    source = tiny_experiment(task="labels", epochs=2)
    src_dir = prepare(source, tmp_path / "a", data, None, ["t"])
    run_replicate(source, src_dir, data, 1, 0, progress=False)
    trained = layout.level_dir(src_dir, 1, 0) / "train" / layout.MODEL
    exp = tiny_experiment(task="rotation", epochs=1, pretrained=str(trained))
    assert exp.name() != tiny_experiment(task="rotation", epochs=1).name()   # its own experiment
    exp_dir = prepare(exp, tmp_path / "b", data, None, ["t"])
    run_replicate(exp, exp_dir, data, 1, 1, progress=False)
    init = layout.load_tensors(layout.replicate_dir(exp_dir, 1) / layout.INIT)
    src = layout.load_tensors(trained)
    backbone_keys = [k for k in src if k.startswith("backbone.")]
    assert all(torch.equal(init[k], src[k]) for k in backbone_keys)      # the pre-trained backbone
    assert init["task.head.weight"].shape == (4, 128)                      # RotNet's own, fresh head
    assert layout.is_done(layout.level_dir(exp_dir, 1, 1) / "train")
    from sslprune.report import collect
    assert {r["objective"] for r in collect([exp_dir])} == {f"rotation from {src_dir.name} level 0"}
    # The file it started from is part of the run: a changed file is refused on re-run.
    tensors = dict(src)
    tensors["backbone.features.0.weight"] = tensors["backbone.features.0.weight"] + 1
    layout.save_tensors(trained, tensors)
    with pytest.raises(UserError, match="is not what .* started from"):
        prepare(exp, tmp_path / "b", data, None, ["t"])


def test_torchvision_layout_state_dict_loads_and_mismatches_fail(tmp_path, data):
    torch.manual_seed(0)
    reference = build_model("resnet18")
    sd = {**reference.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    torch.save(sd, tmp_path / "resnet18.pth")
    fresh = build_model("resnet18")
    load_pretrained(fresh, tmp_path / "resnet18.pth")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), reference.state_dict().values()))
    with pytest.raises(UserError, match="does not match"):
        prepare(tiny_experiment(pretrained=str(tmp_path / "resnet18.pth")), tmp_path / "runs", data, None, ["t"])
    assert not (tmp_path / "runs").exists()                                # nothing written
    with pytest.raises(UserError, match="neither a file nor a lottery run directory"):
        prepare(tiny_experiment(pretrained=str(tmp_path / "nope.pth")), tmp_path / "runs", data, None, ["t"])
