"""VICReg: the loss against the paper's own formulation, its views, and runs through the lottery."""
import pytest
import torch

from sslprune.tasks.vicreg import solarise, vicreg_loss, vicreg_view


def _official(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """VICReg's loss as written in the paper's Algorithm 1 and its official code (facebookresearch/vicreg)."""
    n, d = x.shape
    repr_loss = torch.nn.functional.mse_loss(x, y)
    x, y = x - x.mean(dim=0), y - y.mean(dim=0)
    std_x, std_y = torch.sqrt(x.var(dim=0) + 0.0001), torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(torch.relu(1 - std_x)) / 2 + torch.mean(torch.relu(1 - std_y)) / 2
    cov_x, cov_y = (x.T @ x) / (n - 1), (y.T @ y) / (n - 1)
    off = ~torch.eye(d, dtype=torch.bool)
    cov_loss = cov_x[off].pow(2).sum() / d + cov_y[off].pow(2).sum() / d
    return 25 * repr_loss + 25 * std_loss + 1 * cov_loss


def test_vicreg_loss_is_the_papers():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 16, generator=g, dtype=torch.float64), torch.randn(32, 16, generator=g, dtype=torch.float64)
    loss, terms = vicreg_loss(x, y)
    torch.testing.assert_close(loss, _official(x, y))
    # identical views: no invariance loss; collapsed embeddings: the variance hinge is ~1 (std 0.01)
    assert vicreg_loss(x, x)[1]["invariance"] == 0
    same = torch.ones(8, 4, dtype=torch.float64)
    assert vicreg_loss(same, same)[1]["variance"] == pytest.approx(0.99)
    # decorrelated, unit-variance dimensions: no covariance loss, no variance loss
    white = torch.cat([torch.eye(4), -torch.eye(4)]).double() * (7 / 2) ** 0.5   # (8, 4): var 1, cov 0
    _, t = vicreg_loss(white, white)
    assert t["covariance"] == pytest.approx(0, abs=1e-12) and t["variance"] == pytest.approx(0, abs=1e-3)


def test_views_are_random_per_image_and_stay_images():
    x = torch.rand(6, 3, 16, 16)
    a, b = vicreg_view(x, torch.Generator().manual_seed(0)), vicreg_view(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1 and not torch.allclose(a, b)
    assert torch.equal(vicreg_view(x, torch.Generator().manual_seed(0)), a)        # reproducible from the generator
    always = solarise(x, torch.Generator().manual_seed(0), p=1.0)
    assert torch.equal(always, torch.where(x >= 0.5, 1 - x, x))


def test_vicreg_drives_a_lottery_and_refuses_foreign_options(tmp_path, capsys):
    from sslprune import layout
    from sslprune.cli import main
    flags = ["lottery", "--dataset", "digits", "--model", "convnet", "--optimizer", "adam", "--lr", "1e-3",
             "--batch-size", "64", "--epochs", "2", "--levels", "1", "--quiet", "--root", str(tmp_path)]
    assert main([*flags, "--task", "vicreg", "--projector-dim", "64"]) == 0
    exp = next(tmp_path.iterdir())
    done = layout.load_json(layout.run_dir(layout.level_dir(exp, 1, 1)) / layout.DONE)
    assert done["test_acc"] > 3 / 64                     # retrieval well above chance (1/64)
    capsys.readouterr()
    assert main([*flags, "--task", "rotation", "--projector-dim", "64"]) == 2
    assert "--projector-dim applies to --task vicreg only" in capsys.readouterr().err
