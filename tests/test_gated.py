"""Gated ResNets and VICReg-Dual (Krishna et al. 2023): the gates' estimator, their MACs counted
exactly, deterministic evaluation, per-path batch-norm, the budget losses, resume, and bad input."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sslprune import layout
from sslprune.errors import UserError
from sslprune.lottery import build
from sslprune.models import build_model
from sslprune.models.gated import TAU, open_gates
from sslprune.pruning import dense_mask
from sslprune.tasks.vicreg import budget_losses
from sslprune.train import train

from .conftest import killed_at_evaluation, tiny_experiment


def _macs(model, x, **kw) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, **kw)
    return counter.get_total_flops() // 2       # flop_counter counts a multiply-accumulate as 2


def test_gates_are_hard_forward_and_the_noisy_sigmoid_backward():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 8, generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.rand(64, 8, generator=g, dtype=torch.float64)
    gates = open_gates(logits, u)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / TAU)
    assert set(gates.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(gates.detach(), (soft >= 0.5).double())
    w = torch.randn(64, 8, generator=g, dtype=torch.float64)
    (gates * w).sum().backward()
    torch.testing.assert_close(logits.grad, w * (soft * (1 - soft) / TAU).detach())
    # evaluation: no noise, open where the logit is >= 0
    assert torch.equal(open_gates(logits, None), (logits >= 0).float())   # float32 under any autocast


@pytest.mark.parametrize("name", ["resnet20", "resnet18_cifar"])
def test_macs_counted_from_the_gates_are_what_runs(name):
    """Dense path: flop_counter's count of the ordinary ResNet. Gated path with real skipping (only
    each image's open channels computed): flop_counter's count equals the analytic count from its
    gates, image by image, also for a block whose gates are all closed."""
    torch.manual_seed(0)
    side = 16 if name == "resnet18_cifar" else 32
    model = build_model(name, gated=True).eval()
    x = torch.randn(2, 3, side, side)
    assert _macs(build_model(name).eval(), x[:1]) == model.dense_macs(side)
    assert _macs(model, x[:1]) == model.dense_macs(side)                      # the dense path of the gated model
    blocks = model.blocks()
    pattern = [torch.arange(b.conv1.out_channels) % (i + 2) == 0 for i, b in enumerate(blocks)]
    pattern[1][:] = False                                                    # block 2: everything closed
    for b, p in zip(blocks, pattern):   # a fixed gate pattern; the gate network still runs (its MACs count)
        b.gate.forward = lambda x, p=p, run=b.gate.forward: 0 * run(x) + torch.where(p, 1.0, -1.0)
    for i in range(2):
        counted = _macs(model, x[i:i + 1], path="skip")
        assert counted == int(model.macs(model.gates, side).item())
    open_fraction = sum(int(p.sum()) * c.per_open for p, c in zip(pattern, model.costs(side)[1])) / \
        sum(c.channels * c.per_open for c in model.costs(side)[1])
    assert counted < model.dense_macs(side) and 0 < open_fraction < 1


def test_evaluation_gates_are_deterministic_and_skipping_computes_the_simulated_path():
    torch.manual_seed(0)
    model = build_model("resnet20", gated=True)
    model.train()
    x = torch.randn(8, 3, 16, 16)
    for _ in range(3):                                  # running statistics of both paths
        model(x), model(x, path="gated", uniform=torch.rand(8, model.gate_channels))
    model.eval()
    with torch.no_grad():
        a = model(x, path="gated")
        gates = [g.clone() for g in model.gates]
        b = model(x, path="gated")
        skipped = model(x, path="skip")
        dense = model(x)
    assert torch.equal(a, b) and all(torch.equal(g, h) for g, h in zip(gates, model.gates))
    torch.testing.assert_close(skipped, a, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(dense, a)                 # the paths differ (gates, their own batch-norm)


def test_each_path_updates_only_its_own_batch_norm():
    torch.manual_seed(0)
    model = build_model("resnet20", gated=True).train()
    block = model.blocks()[0]
    before = {k: v.clone() for k, v in block.state_dict().items()}
    model(torch.randn(4, 3, 8, 8))
    moved = {k for k, v in block.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("bn1.") for k in moved) and not any("gated" in k for k in moved)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    model(torch.randn(4, 3, 8, 8), path="gated", uniform=torch.rand(4, model.gate_channels))
    moved = {k for k, v in block.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("bn1_gated.") for k in moved) and not any(k.startswith(("bn1.", "bn2.")) for k in moved)


def test_budget_losses():
    t = 0.25
    ratio = torch.tensor([0.2, 0.4])
    rho = torch.full((3, 4), math.sqrt(t))                 # every block at sqrt(t): inside the epoch-0 band
    spar, bound = budget_losses(ratio, rho, t, progress=0)
    assert spar.item() == pytest.approx(5 * (0.3 - t) ** 2) and bound.item() == 0
    spar, bound = budget_losses(ratio, torch.zeros(3, 4), t, progress=0)   # every channel closed
    assert bound.item() == pytest.approx(t)                # relu(1 * 0.5 - 0)^2
    assert budget_losses(ratio, torch.zeros(3, 4), t, progress=1)[1].item() < 1e-5   # the band has relaxed
    # their p = exp(-0.02 epoch) at 500 epochs: epoch 100 of 500
    p = math.exp(-2)
    assert budget_losses(ratio, torch.zeros(3, 4), t, progress=0.2)[1].item() == pytest.approx((p * 0.5) ** 2)


def _dual(**overrides):
    return tiny_experiment("vicreg", model="resnet20", projector_dim=16, budget=0.5, epochs=3, **overrides)


def test_dual_training_logs_its_terms_and_resumes_bitwise(tmp_path, data, monkeypatch):
    exp = _dual()

    def run(out):
        backbone, task = build(exp, data, seed=0)
        return train(backbone, task, data, exp.train, exp.data, dense_mask(backbone), out, seed=5, progress=False)

    done = run(tmp_path / "straight")
    for key in ("invariance", "variance", "covariance", "spar", "bound", "macs", "open_1", "open_9"):
        assert math.isfinite(done[f"test_{key}"]), key
    assert 0 < done["test_macs"] < 1
    killed_at_evaluation(monkeypatch, 2, lambda: run(tmp_path / "killed"))
    run(tmp_path / "killed")
    a, b = (layout.load_tensors(tmp_path / d / layout.MODEL) for d in ("straight", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".gate." in k for k in a) and any("bn1_gated" in k for k in a)


def test_gates_get_no_weight_decay(data):
    backbone, task = build(_dual(), data, seed=0)
    from sslprune.train import make_optimizer
    opt = make_optimizer(_dual().train, [*backbone.parameters(), *task.parameters()], backbone.no_weight_decay())
    decay, free = opt.param_groups
    assert free["weight_decay"] == 0 and decay["weight_decay"] == 1e-4
    assert {id(p) for p in free["params"]} == {id(p) for b in backbone.blocks() for p in b.gate.parameters()}


@pytest.mark.parametrize("flags, message", [
    (["--budget", "1.5"], "--budget is a fraction of the dense network's MACs, in (0, 1]"),
    (["--budget", "-0.1"], "in (0, 1]"),
    (["--budget", "0.3", "--model", "convnet"], "which --model convnet does not have; choose --model resnet20"),
    (["--budget", "0.3", "--task", "rotation"], "--budget applies to --task vicreg only"),
    (["--budget", "0.3", "--levels", "2"], "pass --levels 0"),
])
def test_bad_gated_input_is_refused_before_anything_is_written(tmp_path, capsys, flags, message):
    from sslprune.cli import main
    base = ["lottery", "--dataset", "digits", "--model", "resnet20", "--task", "vicreg",
            "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "32", "--epochs", "1", "--levels", "0",
            "--quiet", "--root", str(tmp_path / "runs")]
    assert main([*base, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "runs").exists()


def test_a_gated_model_name_without_a_variant_is_refused():
    with pytest.raises(UserError, match="does not have"):
        build_model("vgg19", gated=True)


@pytest.fixture(scope="module")
def dual_runs(tmp_path_factory):
    """A gated run (budget 0.5) and its baseline (budget 0) on the digits, 2 epochs, probed on both paths."""
    from sslprune.cli import main
    root = tmp_path_factory.mktemp("dual") / "runs"
    flags = ["lottery", "--dataset", "digits", "--model", "resnet20", "--task", "vicreg", "--projector-dim", "32",
             "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "64", "--epochs", "2", "--levels", "0",
             "--quiet", "--root", str(root)]
    assert main([*flags, "--budget", "0.5"]) == 0 and main(flags) == 0
    from sslprune.lottery import load_experiment
    exps = {load_experiment(d)[0].task.budget: d for d in root.iterdir()}
    assert main(["eval", "probe", str(exps[0.5])]) == 0 and main(["eval", "probe", str(exps[0.5]), "--stage", "gated"]) == 0
    assert main(["eval", "probe", str(exps[0.0])]) == 0
    return root, exps


def test_both_paths_are_probed_and_reported_as_their_table_1(dual_runs, tmp_path):
    from sslprune.cli import main
    root, exps = dual_runs
    assert main(["report", str(root), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "## Dense and gated paths" in md and "| VICReg (no gates) |" in md and "| VICReg-Dual | 0.5 |" in md
    rows = (tmp_path / "report" / "dual.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 and any(",gated," in r for r in rows)       # dense + gated of one run, the baseline
    assert "| 0.5 | 9 |" in md                                             # ResNet-20's 9 gated blocks, per block
    assert (tmp_path / "report" / "dual_accuracy_vs_macs.png").exists()


def test_the_gated_path_exports_compact_and_computes_what_it_did(dual_runs, tmp_path, capsys):
    from sslprune.cli import main
    from sslprune.export import level_network, load_exported
    root, exps = dual_runs
    assert main(["export", str(exps[0.5]), "--level", "0", "--path", "gated", "--out", str(tmp_path / "g")]) == 0
    info = layout.load_json(tmp_path / "g" / layout.EXPORT_INFO)
    assert info["path"] == "gated" and info["gated_channels"]["of"] == 16 * 3 + 32 * 3 + 64 * 3
    net = load_exported(tmp_path / "g")
    ref, _ = level_network(exps[0.5], 1, 0, None, "gated")
    from sslprune.data import load_dataset
    from sslprune.config import Data
    x = load_dataset(Data(dataset="digits"), None).train.images[:32].float() / 255
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), atol=1e-5, rtol=1e-5)
    # the dense path of the same run: an ordinary ResNet-20
    assert main(["export", str(exps[0.5]), "--level", "0", "--out", str(tmp_path / "d")]) == 0
    assert type(load_exported(tmp_path / "d").backbone).__name__ == "ResNet"
    capsys.readouterr()
    assert main(["export", str(exps[0.0]), "--level", "0", "--path", "gated", "--out", str(tmp_path / "x")]) == 2
    assert main(["eval", "probe", str(exps[0.0]), "--stage", "gated"]) == 2
    err = capsys.readouterr().err
    assert "--path gated exports the gated path of a run trained with --budget" in err
    assert "--stage gated probes the gated path of a run trained with --budget" in err
    assert not (tmp_path / "x").exists()


def test_compact_gated_keeps_what_opens():
    from sslprune.models.gated import compact_gated, opened_channels
    torch.manual_seed(0)
    model = build_model("resnet20", gated=True).eval()
    closed = [torch.arange(b.conv1.out_channels) % 3 == 0 for b in model.blocks()]   # never open
    closed[1][:] = True                                                             # block 2: nothing ever opens
    with torch.no_grad():   # the gate's hidden units all 1 (batch-norm weight 0, bias 1): logits = row sums
        for b, c in zip(model.blocks(), closed):
            b.gate.bn.weight.zero_(), b.gate.bn.bias.fill_(1.0)
            b.gate.conv2.weight.copy_(torch.where(c, -1.0, 1.0)[:, None, None, None].expand_as(b.gate.conv2.weight))
    x = torch.rand(16, 3, 16, 16)
    keep = opened_channels(model, x, lambda t: t)
    assert all(not (k & c).any() for k, c in zip(keep, closed))
    small = compact_gated(model, keep)
    assert [b.conv1.out_channels for b in small.blocks()] == [max(1, int(k.sum())) for k in keep]   # one kept, closed
    with torch.no_grad():
        torch.testing.assert_close(small(x, path="gated"), model(x, path="gated"), atol=1e-5, rtol=1e-5)


def test_a_sweep_probes_the_gated_path_only_where_there_is_one(tmp_path):
    from sslprune.sweep import Sweep, load_spec
    spec = tmp_path / "dual.toml"
    spec.write_text('levels = 0\nreplicates = 2\n[base]\ndataset = "digits"\nmodel = "resnet20"\ntask = "vicreg"\n'
                    'optimizer = "adam"\nlr = 1e-3\nbatch_size = 64\nepochs = 1\n[grid]\nbudget = [0.0, 0.5]\n'
                    '[[evaluations.probe]]\ndataset = "digits"\n[[evaluations.probe]]\ndataset = "digits"\nstage = "gated"\n')
    steps = Sweep(load_spec(spec)).steps()
    probes = {(s.experiment.task.budget, s.item) for s in steps if s.kind == "probe"}
    assert probes == {(0.0, 0), (0.5, 0), (0.5, 1)}
    assert sum(s.kind == "probe" for s in steps) == 2 * 3


def test_evaluation_measures_the_gates_on_the_test_images_exactly_in_any_precision():
    """Realised MACs and per-block counts come from the test images themselves (not the random
    views), counted exactly; a test split smaller than the batch is evaluated, not an IndexError."""
    from sslprune.config import Task as TaskConfig
    from sslprune.data.augment import Normalize
    from sslprune.models.gated import gate_statistics
    from sslprune.tasks import build_task
    torch.manual_seed(0)
    backbone = build_model("resnet20", gated=True)
    task = build_task(TaskConfig(task="vicreg", projector_dim=16, budget=0.5), 64, 10, 100)
    images, labels = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8), torch.zeros(20, dtype=torch.long)
    normalize = Normalize(torch.full((3,), 0.5), torch.full((3,), 0.25))
    got = task.evaluate(backbone, images, labels, normalize, batch_size=32)          # 20 images < batch 32
    want = gate_statistics(backbone.eval(), images, normalize, 7)                     # other batching, same images
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k
    logits = torch.randn(4, 8).bfloat16()
    assert open_gates(logits, None).dtype == torch.float32                           # summed exactly under bf16 autocast
