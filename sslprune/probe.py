"""Linear probe: how much label information a trained (pruned) backbone's frozen features hold.

Features come from the backbone in eval mode (batch-norm uses its running statistics, nothing is
updated) under torch.no_grad, without augmentation. The classifier is scikit-learn's multinomial
logistic regression on standardised features; its inverse regularisation C is chosen on a held-out
fifth of the training split (stratified, fixed seed), then refitted on the whole training split.
The test split is touched once, at the end.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .data.augment import Normalize

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


@torch.no_grad()
def features(backbone: nn.Module, images: torch.Tensor, normalize: Normalize, batch_size: int = 256) -> np.ndarray:
    """(N, 3, H, W) uint8 -> (N, F) float32 features of the frozen backbone."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    out = [backbone(normalize(images[i:i + batch_size].to(device))).float().cpu()
           for i in range(0, len(images), batch_size)]
    backbone.train(was_training)
    return torch.cat(out).numpy()


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
              seed: int = 0) -> dict:
    """Returns test accuracy, mean per-class accuracy, the chosen C and its validation accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def model(c):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))

    fit_x, val_x, fit_y, val_y = train_test_split(train_x, train_y, test_size=0.2, random_state=seed,
                                                  stratify=train_y)
    scores = {c: model(c).fit(fit_x, fit_y).score(val_x, val_y) for c in C_GRID}
    best = max(C_GRID, key=lambda c: (scores[c], -c))  # ties: the stronger regularisation
    pred = model(best).fit(train_x, train_y).predict(test_x)
    per_class = [float((pred[test_y == k] == k).mean()) for k in np.unique(test_y)]
    return {"acc": float((pred == test_y).mean()), "mean_class_acc": float(np.mean(per_class)),
            "C": best, "val_acc": scores[best]}


def probe_level(exp_dir, replicate: int, level: int, data, device: str = "cpu") -> dict:
    """Probe the backbone that level `level` of a lottery run trained, on `data`'s labels (all of
    them: the probe is an evaluation, whatever labels the objective saw)."""
    from . import layout
    from .lottery import load_experiment
    from .models import build_model
    from .train import load_weights

    exp, _ = load_experiment(exp_dir)
    backbone = build_model(exp.model.model).to(device)
    run = layout.level_dir(exp_dir, replicate, level) / "train"
    load_weights(backbone, None, layout.load_tensors(run / layout.MODEL))
    norm = Normalize(*data.channel_stats()).to(device)
    return fit_probe(features(backbone, data.train.images, norm), data.train.labels.numpy(),
                     features(backbone, data.test.images, norm), data.test.labels.numpy())
