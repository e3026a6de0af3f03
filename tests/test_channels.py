"""Channel (structured) pruning: groups, levels as whole channels, and the compact network."""
import pytest
import torch
from torch import nn

from sslprune import channels, layout
from sslprune.errors import UserError
from sslprune.lottery import prepare, run_replicate
from sslprune.models import build_model
from sslprune.pruning import apply_mask
from sslprune.retrain import retrain

from .conftest import tiny_experiment

FAMILIES = [("convnet", 16), ("resnet20", 16), ("resnet18_cifar", 16), ("vgg19", 32), ("resnet50", 32)]


def _randomised(name: str) -> nn.Module:
    """A backbone whose batch-norm layers are not the identity (as after training)."""
    torch.manual_seed(0)
    bb = build_model(name)
    for m in bb.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return bb.eval()


@pytest.mark.parametrize("name,size", FAMILIES)
def test_compact_network_computes_what_the_masked_one_does(name, size):
    bb = _randomised(name)
    groups = channels.channel_groups(bb)
    alive = [torch.ones(g.size, dtype=torch.bool) for g in groups]
    for _ in range(3):
        alive = channels.prune_channels(groups, alive, channels.channel_scores(groups, bb.state_dict(), "l1"), 0.3)
    mask = channels.channel_mask(bb, groups, alive)
    apply_mask(bb, mask)
    head = nn.Linear(bb.feature_dim, 5)
    small, small_head = channels.compact(bb, groups, alive, head)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected, got = head(bb(x)), small_head(small(x))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    n_dense = sum(p.numel() for p in bb.parameters())
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small < 0.6 * n_dense                                       # channels really removed
    assert small.feature_dim == bb.feature_dim and small_head.in_features == bb.feature_dim
    # the channel state read back from the weight mask is the one that made it
    assert all(torch.equal(a, b) for a, b in zip(alive, channels.alive_channels(groups, mask)))


def test_groups_couple_residual_channels_and_spare_the_features():
    groups = channels.channel_groups(build_model("resnet20"))
    members = [dict(g.members) for g in groups]
    # the features a head reads (layer3's residual stream) are never a group
    assert not any(m.get("layer3.2.conv2") == 0 or m.get("layer3.0.downsample.0") == 0 for m in members)
    # layer2's residual stream: every conv2 and the downsample output, every reader's input
    stream = next(m for m in members if "layer2.0.downsample.0" in m and m["layer2.0.downsample.0"] == 0)
    assert {k for k, d in stream.items() if d == 0} == {"layer2.0.downsample.0", "layer2.0.conv2",
                                                           "layer2.1.conv2", "layer2.2.conv2"}
    assert stream["layer3.0.conv1"] == 1 and stream["layer3.0.downsample.0"] == 1


def test_level_removes_the_fraction_of_channels_and_keeps_every_layer():
    bb = _randomised("resnet20")
    groups = channels.channel_groups(bb)
    alive = [torch.ones(g.size, dtype=torch.bool) for g in groups]
    total = sum(g.size for g in groups)
    scores = channels.channel_scores(groups, bb.state_dict(), "bn")
    out = channels.prune_channels(groups, alive, scores, 0.2)
    assert sum(int(a.sum()) for a in out) == total - round(0.2 * total)
    for _ in range(20):
        try:
            out = channels.prune_channels(groups, out, scores, 0.2)
        except UserError as e:
            assert "would remove a whole layer" in str(e)
            break
    assert all(int(a.sum()) >= 1 for a in out)


def test_rounded_levels_keep_a_multiple_of_round_to_in_every_layer():
    bb = _randomised("resnet20")
    groups = channels.channel_groups(bb)
    scores = channels.channel_scores(groups, bb.state_dict(), "l1")
    alive = [torch.ones(g.size, dtype=torch.bool) for g in groups]
    for _ in range(4):
        before = sum(int(a.sum()) for a in alive)
        out = channels.prune_channels(groups, alive, scores, 0.2, round_to=8)
        kept = [int(a.sum()) for a in out]
        assert all(n % 8 == 0 and n >= 8 for n in kept), kept
        assert abs((before - sum(kept)) - round(0.2 * before)) <= 4       # the nearest whole blocks
        for a, o, s in zip(alive, out, scores):                           # a group's lowest scores go
            gone, stay = s[a & ~o], s[o]
            assert len(gone) == 0 or gone.max() <= stay.min()
        alive = out
    assert sum(int(a.sum()) for a in alive) < 0.6 * sum(g.size for g in groups)
    small, _ = channels.compact(bb, groups, alive)
    widths = [m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths), widths


def test_a_rounded_level_that_removes_nothing_is_refused():
    """16 channels in blocks of 8 at 20%: 3 should go, a block of 8 overshoots more than it helps;
    the level would repeat the last mask, so it is refused, before the run (check_levels) too."""
    groups = [channels.Group(members=(("a", 0),), norms=(), size=16)]
    with pytest.raises(UserError, match="removes no whole block of 8"):
        channels.prune_channels(groups, [torch.ones(16, dtype=torch.bool)], [torch.rand(16)], 0.2, round_to=8)


def test_channel_lottery_retrain_and_random_baseline(tmp_path, data):
    exp = tiny_experiment(task="rotation", granularity="channel", channel_score="l2", epochs=1)
    assert exp.name() != tiny_experiment(task="rotation", epochs=1).name()
    assert tiny_experiment(granularity="weight").name() == tiny_experiment().name()  # old names kept
    exp_dir = prepare(exp, tmp_path, data, None, ["t"])
    run_replicate(exp, exp_dir, data, 1, 2, progress=False)
    bb = build_model("convnet")
    groups = channels.channel_groups(bb)
    kept = []
    for level in range(3):
        mask = layout.load_tensors(layout.level_dir(exp_dir, 1, level) / layout.MASK)
        alive = channels.check_mask_is_channels(groups, mask, bb)     # whole channels, nothing else
        kept.append(sum(int(a.sum()) for a in alive))
        trained = layout.load_tensors(layout.level_dir(exp_dir, 1, level) / "train" / layout.MODEL)
        w = trained["backbone.features.0.weight"]
        assert torch.all(w[~alive[0]] == 0) and torch.all(w[alive[0]].abs().sum((1, 2, 3)) > 0)
    assert kept == [96, 96 - round(0.2 * 96), 77 - round(0.2 * 77)]
    retrain(exp, exp_dir, data, 1, 2, "random")
    random = layout.load_tensors(layout.level_dir(exp_dir, 1, 2) / "retrain_random" / layout.MASK)
    r_alive = channels.check_mask_is_channels(groups, random, bb)
    assert sum(int(a.sum()) for a in r_alive) == kept[2]                # as many channels, others
    with pytest.raises(UserError, match="random_adjusted"):
        retrain(exp, exp_dir, data, 1, 2, "random_adjusted")


@pytest.mark.parametrize("overrides,message", [
    (dict(granularity="filters"), "unknown granularity"),
    (dict(granularity="channel", channel_score="taylor"), "unknown channel-score"),
    (dict(channel_score="bn"), "applies to --granularity channel only"),
    (dict(granularity="channel", layers=2), "drop --layers"),
    (dict(channel_round=8), "applies to --granularity channel only"),
    (dict(granularity="channel", channel_round=0), "at least 1"),
])
def test_bad_channel_options_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        tiny_experiment(**overrides).validate()


def test_a_schedule_that_would_empty_a_layer_is_refused_before_anything_is_written(tmp_path, capsys):
    from sslprune.cli import main
    flags = ["lottery", "--dataset", "digits", "--model", "convnet", "--task", "labels", "--optimizer", "adam",
             "--lr", "1e-3", "--batch-size", "32", "--epochs", "1", "--granularity", "channel", "--quiet",
             "--root", str(tmp_path / "runs")]
    # the convnet's two prunable layers (32 + 64 channels) keep one channel each: 94 can go
    assert main(flags + ["--fraction", "0.99", "--levels", "1"]) == 2
    assert "would remove 95 of the 96 surviving channels" in capsys.readouterr().err
    # 96 -> 48 -> 24 -> 12 -> 6 -> 3 channels, then 2 more would leave one layer with none
    assert main(flags + ["--fraction", "0.5", "--levels", "6"]) == 2
    assert "level 6 would remove 2 of the 3 surviving channels, emptying a layer" in capsys.readouterr().err
    # rounded to 8: each layer keeps a block of 8 at least, 16 in all
    assert main(flags + ["--fraction", "0.5", "--levels", "3", "--channel-round", "8"]) == 2
    assert "level 3 would remove 12 of the 24 surviving channels" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
