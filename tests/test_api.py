"""The Python API (sslprune/api.py, re-exported by sslprune/__init__.py) and README's example."""
import copy
import math
import pkgutil
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune
from torch.utils.data import DataLoader, TensorDataset

import sslprune
from sslprune.errors import UserError

from .conftest import tiny_dataset

README = Path(__file__).resolve().parents[1] / "README.md"


def small_net(flatten=True) -> nn.Module:
    """A user's backbone: no feature_dim attribute; (B, 3, 8, 8) -> (B, 8)."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
              nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1)]
    return nn.Sequential(*layers, *([nn.Flatten(), nn.Linear(8, 8)] if flatten else []))


def pruned_zero(model, mask) -> bool:
    weights = dict(model.named_parameters())
    return all(bool((weights[n][~m] == 0).all()) for n, m in mask.items())


def test_version_and_cheap_import():
    assert sslprune.__version__ == metadata.version("sslprune")
    code = "import sys, sslprune; print(sslprune.__version__, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=README.parent).stdout.split()
    assert out == [metadata.version("sslprune"), "False"]  # no torch until an API name is used


def test_api_names_leave_submodules_alone():
    from sslprune import layout
    from sslprune import train as train_module
    from sslprune.cli import main

    assert callable(main) and hasattr(layout, "MODEL") and hasattr(train_module, "train")
    submodules = {m.name for m in pkgutil.iter_modules(sslprune.__path__)}
    assert not set(sslprune.__all__) & submodules      # no API name shadows a submodule
    assert set(sslprune.__all__) <= set(dir(sslprune))
    with pytest.raises(AttributeError):
        sslprune.no_such_name


def test_prune_global_is_global_exact_and_nested():
    model = small_net()
    with torch.no_grad():                                # the first conv's weights are the smallest
        model[0].weight.uniform_(-0.01, 0.01), model[3].weight.uniform_(0.5, 1), model[8].weight.uniform_(-1, -0.5)
    mask = sslprune.prune_global(model, 0.2)
    assert set(mask) == {"0.weight", "3.weight", "8.weight"}
    assert all(mask[n].dtype == torch.bool and mask[n].shape == w.shape for n, w in model.named_parameters()
               if n in mask)
    assert int(mask["0.weight"].sum()) == 108 - round(0.2 * (108 + 288 + 64))   # exactly that many
    assert mask["3.weight"].all() and mask["8.weight"].all()   # ranked across layers, not per layer
    again = sslprune.prune_global(model, 0.2, mask)
    assert all(not (again[n] & ~mask[n]).any() for n in mask)      # nested: nothing revived
    assert sslprune.density(again) == pytest.approx(0.8 * 0.8, abs=1e-2)
    assert all(torch.equal(a, b) for a, b in zip(sslprune.prune_global(model, 0.0, mask).values(), mask.values()))
    random = sslprune.prune_global(model, 0.2, score="random", generator=torch.Generator().manual_seed(0))
    assert not random["3.weight"].all()                  # random scores ignore the magnitudes
    assert pruned_zero(sslprune.apply_mask(model, again), again)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan"), True, "0.2"])
def test_prune_global_refuses_a_bad_fraction(fraction):
    with pytest.raises(UserError, match=r"fraction must be a number in \[0, 1\)"):
        sslprune.prune_global(small_net(), fraction)


def test_a_mask_of_another_model_is_refused():
    model, mask = small_net(), sslprune.prune_global(small_net(), 0.5)
    with pytest.raises(UserError, match=r"unknown \['8.weight'\].*prune_global"):
        sslprune.apply_mask(small_net(flatten=False), mask)
    mask["0.weight"] = mask["0.weight"][:2]
    with pytest.raises(UserError, match=r"mask\['0.weight'\] is \(2, 3, 3, 3\)"):
        sslprune.prune_global(model, 0.2, mask)
    with pytest.raises(UserError, match="no Conv2d or Linear"):
        sslprune.prune_global(nn.ReLU(), 0.2)


def test_enforce_mask_holds_pruned_weights_at_zero_in_a_users_loop():
    model = small_net()
    mask = sslprune.prune_global(model, 0.7)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, weight_decay=0.1)
    x = torch.randn(8, 3, 8, 8)

    def step():
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()

    with sslprune.enforce_mask(model, mask, optimizer):
        assert pruned_zero(model, mask)                   # zeroed on entry
        for _ in range(3):
            step()
            assert pruned_zero(model, mask)
            weights = dict(model.named_parameters())      # and no pruned gradient reached the step
            assert all(bool((weights[n].grad[~m] == 0).all()) for n, m in mask.items())
    step()                                                # the hook is gone: Adam's moments revive them
    assert not pruned_zero(model, mask)


def test_torch_prune_round_trip_computes_what_our_mask_computes():
    model = small_net().eval()
    mask = sslprune.prune_global(model, 0.6)
    ours = sslprune.apply_mask(copy.deepcopy(model), mask)
    theirs = sslprune.to_torch_prune(copy.deepcopy(model), mask)
    assert {n for n, _ in theirs.named_buffers()} >= {"0.weight_mask", "3.weight_mask", "8.weight_mask"}
    x = torch.randn(5, 3, 8, 8)
    torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=0)
    with pytest.raises(UserError, match="from_torch_prune"):
        sslprune.prune_global(theirs, 0.2)                # a torch-pruned model is converted first
    back = sslprune.from_torch_prune(theirs)
    assert back.keys() == mask.keys() and all(torch.equal(back[n], mask[n]) for n in mask)
    assert not any(n.endswith(("_orig", "_mask")) for n in theirs.state_dict())
    assert all(torch.equal(theirs.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_from_torch_prune_reads_torchs_own_pruning():
    model = small_net()
    torch_prune.global_unstructured([(model[0], "weight"), (model[3], "weight")],
                                    pruning_method=torch_prune.L1Unstructured, amount=0.5)
    mask = sslprune.from_torch_prune(model)
    assert mask["8.weight"].all()                         # a layer torch left alone is dense
    assert int(mask["0.weight"].sum() + mask["3.weight"].sum()) == (108 + 288) // 2
    assert pruned_zero(model, mask)
    torch_prune.l1_unstructured(model[0], "bias", amount=0.5)
    with pytest.raises(UserError, match=r"pruned 0\.bias.*remove"):
        sslprune.from_torch_prune(model)


def test_fit_trains_a_users_backbone_under_a_mask():
    data = tiny_dataset()
    model = small_net()
    mask = sslprune.prune_global(model, 0.5)
    metrics = sslprune.fit(model, data.train.images, data.train.labels, objective="labels", mask=mask,
                           test=(data.test.images, data.test.labels), epochs=2, batch_size=32, lr=3e-3,
                           weight_decay=1e-4, crop_pad=1)
    assert {"train_loss", "train_acc", "test_loss", "test_acc", "epochs"} <= metrics.keys()
    assert metrics["epochs"] == 2 and math.isfinite(metrics["train_loss"])
    assert pruned_zero(model, mask) and model.training
    assert sslprune.infer_feature_dim(model, (3, 8, 8)) == 8


def test_fit_reads_a_dataloader_and_a_self_supervised_objective(tmp_path):
    data = tiny_dataset(n_train=64)
    loader = DataLoader(TensorDataset(data.train.images, data.train.labels), batch_size=20)
    model = small_net(flatten=False)
    with pytest.raises(UserError, match="nn.Flatten"):   # (B, 8, 1, 1) is no feature vector
        sslprune.fit(model, loader, objective="rotation")
    model = nn.Sequential(model, nn.Flatten())
    first = sslprune.fit(model, loader, objective="rotation", epochs=1, batch_size=16, out=tmp_path, flip=True)
    assert 0.0 <= first["test_acc"] <= 1.0 and (tmp_path / "model.safetensors").exists()
    assert sslprune.fit(model, loader, objective="rotation", epochs=1, batch_size=16, out=tmp_path, flip=True) == first


@pytest.mark.parametrize("kwargs, message", [
    (dict(images=torch.rand(8, 3, 8, 8)), "uint8 .*PILToTensor"),
    (dict(objective="jigsaw"), "unknown objective 'jigsaw'; choose one of: labels, rotation"),
    (dict(bogus=1), "unknown option 'bogus'; valid: .*momentum"),
    (dict(labels=None), "objective 'labels' trains on labels; pass labels"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), r"labels must be integers \(N,\) = \(8,\)"),
    (dict(batch_size=9), "batch_size=9 exceeds the 8 training images"),
    (dict(lr=0), "lr must be a finite number > 0"),
    (dict(objective="npid"), "knn 200 exceeds the 8 rows"),
    (dict(momentum=0.9), "^momentum applies to optimizer sgd or lars only"),         # the CLI's checks, in API words
    (dict(objective="s4l"), "^objective s4l needs .*: set label_fraction in"),
    (dict(mask={"0.weight": torch.ones(4, 3, 3, 3, dtype=torch.bool)}), "mask does not match the model"),
])
def test_fit_refuses_bad_input_in_one_line(kwargs, message):
    args = dict(images=torch.zeros(8, 3, 8, 8, dtype=torch.uint8), labels=torch.arange(8) % 2, batch_size=4)
    args.update(kwargs)
    with pytest.raises(UserError, match=message) as e:
        sslprune.fit(small_net(), args.pop("images"), args.pop("labels"), **args)
    assert "\n" not in str(e.value)


def readme_example() -> str:
    """The one ```python block of README's "## Python API" section (which sits right before "## Commands")."""
    text = README.read_text()
    section = re.search(r"^## Python API\n(.*?)^## ", text, re.S | re.M)
    assert section and text[section.end(1):].startswith("## Commands\n")
    blocks = re.findall(r"^```python\n(.*?)^```$", section.group(1), re.S | re.M)
    assert len(blocks) == 1
    return blocks[0]


def test_readme_example_runs():
    exec(compile(readme_example(), f"{README}:Python API", "exec"), {"__name__": "readme_example"})
