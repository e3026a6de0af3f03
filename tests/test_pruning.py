import torch
from torch import nn

from sslprune.models import build_model
from sslprune.pruning import (SCORES, MaskEnforcer, apply_mask, dense_mask, density, prunable, pruned_layers,
                              prune, prune_iteratively, report)


def magnitude_levels(backbone, levels, fraction=0.2):
    return [prune_iteratively(backbone, level, fraction) for level in range(levels + 1)]


def test_prunable_is_conv_and_linear_weights_only():
    for name in ("convnet", "resnet20", "vgg19"):
        b = build_model(name)
        names = set(prunable(b))
        convs = {f"{n}.weight" for n, m in b.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        assert names == convs
        bn = {f"{n}.{p}" for n, m in b.named_modules() if isinstance(m, nn.BatchNorm2d) for p in ("weight", "bias")}
        assert not names & bn
        assert all(not n.endswith("bias") for n in names)


def test_exact_count_per_level_and_nesting():
    b = build_model("resnet20")
    masks = magnitude_levels(b, 6)
    total = sum(m.numel() for m in masks[0].values())
    kept = total
    for level, (prev, cur) in enumerate(zip(masks, masks[1:]), start=1):
        kept -= round(0.2 * kept)
        assert sum(int(m.sum()) for m in cur.values()) == kept  # exactly 20% of the survivors
        for n in cur:
            assert not (cur[n] & ~prev[n]).any()                  # nested: nothing regrows
        assert abs(density(cur) - 0.8 ** level) < 1e-4


def test_global_not_layerwise():
    b = build_model("convnet")
    w = prunable(b)
    with torch.no_grad():
        w["features.0.weight"].mul_(1e-8)  # a layer of tiny weights goes first under a global ranking
    mask = prune(SCORES["magnitude"](w), dense_mask(b), 0.01)
    removed = round(0.01 * sum(p.numel() for p in w.values()))   # 930; features.0 has 864 weights
    assert not mask["features.0.weight"].any()
    assert int((~mask["features.3.weight"]).sum() + (~mask["features.6.weight"]).sum()) == removed - 864


def test_ties_at_zero_still_remove_exact_count():
    b = build_model("convnet")
    w = prunable(b)
    with torch.no_grad():
        for p in w.values():
            p.view(-1)[: p.numel() // 2] = 0.0   # half of every layer exactly zero: massive ties
    mask = prune(SCORES["magnitude"](w), dense_mask(b), 0.2)
    total = sum(p.numel() for p in w.values())
    assert sum(int(m.sum()) for m in mask.values()) == total - round(0.2 * total)
    for n, m in mask.items():                      # only zeros were removed
        assert (w[n][~m] == 0).all()


def test_random_scores_are_seeded():
    b = build_model("convnet")
    a = prune(SCORES["random"](prunable(b), torch.Generator().manual_seed(1)), dense_mask(b), 0.5)
    c = prune(SCORES["random"](prunable(b), torch.Generator().manual_seed(1)), dense_mask(b), 0.5)
    d = prune(SCORES["random"](prunable(b), torch.Generator().manual_seed(2)), dense_mask(b), 0.5)
    assert all(torch.equal(a[n], c[n]) for n in a)
    assert any(not torch.equal(a[n], d[n]) for n in a)


def test_random_pruning_thins_every_layer_alike():
    """The random baseline thins every layer alike: each keeps about the global density (a binomial
    draw per layer, within 5 s.d.), level after level, never magnitude's uneven cut."""
    import math
    b = build_model("convnet")
    mask, g = dense_mask(b), torch.Generator().manual_seed(0)
    for _ in range(10):
        mask = prune(SCORES["random"](prunable(b), g), mask, 0.2)
        d = density(mask)
        for n, m in mask.items():
            assert abs(float(m.float().mean()) - d) <= 5 * math.sqrt(d * (1 - d) / m.numel()), n


def test_enforcer_and_apply_zero_pruned_weights():
    b = build_model("convnet")
    mask = magnitude_levels(b, 3)[-1]
    with torch.no_grad():
        for p in prunable(b).values():
            p.add_(1.0)            # every weight non-zero
    MaskEnforcer(b, mask)()
    for n, p in prunable(b).items():
        assert (p[~mask[n]] == 0).all() and (p[mask[n]] != 0).all()
    apply_mask(b, mask)
    assert report(mask)[-1]["density"] == density(mask)


def test_layerwise_pruning_never_touches_layers_past_n(tmp_path, data):
    import csv

    import pytest

    from sslprune import layout
    from sslprune.errors import UserError
    from sslprune.lottery import prepare, run_replicate
    from sslprune.report import write_report
    from sslprune.retrain import random_mask

    from .conftest import tiny_experiment

    exp = tiny_experiment(epochs=1, layers=2)
    exp_dir = prepare(exp, tmp_path, data, None, ["t"])
    run_replicate(exp, exp_dir, data, 1, 3, progress=False)
    backbone = build_model("convnet")
    first, rest = pruned_layers(backbone, 2), [n for n in prunable(backbone) if n not in pruned_layers(backbone, 2)]
    assert first == ["features.0.weight", "features.3.weight"] and rest
    for level in range(4):
        for mask in (layout.load_tensors(layout.level_dir(exp_dir, 1, level) / layout.MASK),
                     random_mask(exp, exp_dir, backbone, 1, level)):
            assert all(mask[n].all() for n in rest)                          # past n: untouched
            kept = sum(int(mask[n].sum()) for n in first)
            total = sum(mask[n].numel() for n in first)
            assert abs(kept - 0.8 ** level * total) <= 2                     # 20% per level of the first n
    density_json = layout.load_json(layout.level_dir(exp_dir, 1, 3) / layout.DENSITY)["layers"]
    assert [r["layer"] for r in density_json[-2:]] == ["total", "pruned layers"]
    rows = list(csv.DictReader(open(write_report([exp_dir], tmp_path / "rep")["csv"])))
    last = next(r for r in rows if r["level"] == "3")
    share = total / sum(m.numel() for m in dense_mask(backbone).values())   # the first n's share of weights
    assert abs(float(last["remaining"]) - 0.512) < 1e-3
    assert abs(float(last["remaining_network"]) - (1 - share * (1 - 0.512))) < 1e-3
    with pytest.raises(UserError, match="--layers 9"):
        prepare(tiny_experiment(layers=9), tmp_path / "other", data, None, ["t"])


def test_layer_scope_thins_each_layer_by_the_fraction_of_its_own():
    """scope 'layer': each layer loses round(fraction * its survivors), its own lowest-scoring ones,
    however small its weights are next to the others' (global would empty it first); nested."""
    b = build_model("convnet")
    w = prunable(b)
    with torch.no_grad():
        w["features.0.weight"].mul_(1e-8)
    scores, mask = SCORES["magnitude"](w), dense_mask(b)
    for _ in range(5):
        before = {n: int(m.sum()) for n, m in mask.items()}
        new = prune(scores, mask, 0.2, scope="layer")
        for n, m in new.items():
            assert int(m.sum()) == before[n] - round(0.2 * before[n]) and not (m & ~mask[n]).any()
            kept, dropped = scores[n][m], scores[n][mask[n] & ~m]
            assert dropped.max() <= kept.min()            # the layer's own lowest went
        mask = new
    assert {n: round(float(m.float().mean()), 2) for n, m in mask.items()} == {n: 0.33 for n in mask}
    assert prune(scores, dense_mask(b), 0.2, layers=["features.3.weight"], scope="layer")["features.0.weight"].all()


def test_layer_scope_runs_and_its_random_baseline_keeps_the_lotterys_layer_counts(tmp_path, data):
    """--scope layer end to end: every pruned layer at 0.8^L of its weights (to one weight per level),
    the random baseline's mask with the lottery's count in each layer, the name apart from global's,
    and channel granularity refusing it."""
    import pytest

    from sslprune import layout
    from sslprune.errors import UserError
    from sslprune.lottery import prepare, run_replicate
    from sslprune.retrain import random_mask

    from .conftest import tiny_experiment

    exp = tiny_experiment(epochs=1, scope="layer")
    assert exp.name() != tiny_experiment(epochs=1).name()
    exp_dir = prepare(exp, tmp_path, data, None, ["t"])
    run_replicate(exp, exp_dir, data, 1, 3, progress=False)
    backbone = build_model("convnet")
    for level in range(4):
        lottery = layout.load_mask(layout.level_dir(exp_dir, 1, level) / layout.MASK)
        rand = random_mask(exp, exp_dir, backbone, 1, level)
        for n, m in lottery.items():
            assert abs(int(m.sum()) - 0.8 ** level * m.numel()) <= level
            assert int(rand[n].sum()) == int(m.sum())
    with pytest.raises(UserError, match="--scope layer prunes single weights layer by layer"):
        tiny_experiment(granularity="channel", scope="layer").validate()
