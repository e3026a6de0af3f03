"""Many small networks per step (issue "A study's wall-clock", part 2): does training K networks of
the same shape in one step beat training them one after another, on this machine?

Each network has its own weights, Adam and a 10-way head with cross-entropy, as the re-trainings
of a level. A step of all K is timed, in one run, as:
    one by one      K ordinary steps, one network after the other
    stacked         sslprune's --stack (sslprune/stacked.py): vmap of a functional call over the K
                    networks' stacked parameters and buffers, one backward of the summed losses, one
                    Adam over the stacked tensors; "shared": one batch for all K (the re-trainings of
                    one replicate share their data order), "own": a batch each
    grouped         the K networks as one with groups=K convolutions and a batched head (convnet only)
    ceiling         ONE network on a batch K times larger: the K steps' arithmetic in one call, with
                    one step's overhead. No way of stacking K networks can do much better than this,
                    so one by one / ceiling bounds what stacking could gain here.
Ratios are "one by one / way": above 1, stacking pays.

    python benchmarks/many_networks.py                       # the demo's convnet (8x8) and ResNet-20 (32x32)
    python benchmarks/many_networks.py --device cuda         # when a GPU is there
    python benchmarks/many_networks.py --end-to-end          # the demo's re-trainings, whole runs

--end-to-end times whole trainings as `sslprune retrain --stack K` runs them (per-epoch evaluation
and checkpoints included): K re-trainings of the demo's convnet on the digits, each its own random
mask and initialisation, one data order (as one replicate's), by sslprune.stacked.train_stacked
against the same K by train() one after another.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.func import functional_call, vmap

from sslprune.models import build_model
from sslprune.stacked import stack


class Classifier(nn.Module):
    def __init__(self, model: str, classes: int = 10):
        super().__init__()
        self.backbone = build_model(model)
        self.head = nn.Linear(self.backbone.feature_dim, classes)

    def forward(self, x):
        return self.head(self.backbone(x))


class GroupedConvNet(nn.Module):
    """K copies of the demo's convnet as one network: (B, K*3, H, W) -> (K, B, classes)."""

    def __init__(self, k: int, widths=(32, 64, 128), classes: int = 10):
        super().__init__()
        layers, cin = [], 3
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(k * cin, k * w, 3, 1 if i == 0 else 2, 1, bias=False, groups=k),
                       nn.BatchNorm2d(k * w), nn.ReLU(inplace=True)]
            cin = w
        self.features, self.k, self.width = nn.Sequential(*layers), k, cin
        self.head_w = nn.Parameter(torch.randn(k, classes, cin) * 0.05)
        self.head_b = nn.Parameter(torch.zeros(k, 1, classes))

    def forward(self, x):
        f = torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)   # (B, K*C)
        f = f.view(len(x), self.k, self.width).transpose(0, 1)                         # (K, B, C)
        return torch.baddbmm(self.head_b, f, self.head_w.transpose(1, 2))               # (K, B, classes)


def timed(step, repeats: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(model: str, k: int, batch: int, side: int, device: str, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(k, batch, 3, side, side, device=device)
    y = torch.randint(0, 10, (k, batch), device=device)
    nets = [Classifier(model).to(device) for _ in range(k)]

    opts = [torch.optim.Adam(n.parameters(), lr=1e-3) for n in nets]

    def one_by_one():
        for n, o, xi, yi in zip(nets, opts, x, y):
            loss = nn.functional.cross_entropy(n(xi), yi)
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()

    params, buffers, template = stack(nets)        # (K, ...) copies, as --stack builds them
    stacked = torch.optim.Adam(params.values(), lr=1e-3)   # element-wise: K Adams in one

    def loss_of(p, b, xi, yi):
        return nn.functional.cross_entropy(functional_call(template, (p, b), (xi,)), yi)

    def stacked_step(forward, xs, ys):
        def step():
            loss = forward(params, buffers, xs, ys)      # (K,)
            stacked.zero_grad(set_to_none=True)
            loss.sum().backward()
            stacked.step()
        return step

    shared = stacked_step(vmap(loss_of, in_dims=(0, 0, None, None)), x[0], y[0])
    own = stacked_step(vmap(loss_of), x, y)
    big = Classifier(model).to(device)
    big_opt = torch.optim.Adam(big.parameters(), lr=1e-3)
    xb, yb = x.reshape(k * batch, 3, side, side), y.reshape(-1)

    def ceiling():
        loss = nn.functional.cross_entropy(big(xb), yb)
        big_opt.zero_grad(set_to_none=True)
        loss.backward()
        big_opt.step()

    out = {"one by one": timed(one_by_one, repeats), "stacked shared": timed(shared, repeats),
           "stacked own": timed(own, repeats)}
    if model == "convnet":
        grouped = GroupedConvNet(k).to(device)
        gopt = torch.optim.Adam(grouped.parameters(), lr=1e-3)
        xg = x.transpose(0, 1).reshape(batch, k * 3, side, side)   # each network's images in its own channels

        def grouped_step():
            loss = nn.functional.cross_entropy(grouped(xg).reshape(k * batch, -1), y.reshape(-1)) * k
            gopt.zero_grad(set_to_none=True)
            loss.backward()
            gopt.step()

        out["grouped"] = timed(grouped_step, repeats)
    out["ceiling"] = timed(ceiling, repeats)
    return out


def end_to_end(k: int, device: str, epochs: int) -> dict[str, float]:
    import tempfile
    from pathlib import Path

    from sslprune.config import PRESETS, resolve
    from sslprune.data import load_dataset
    from sslprune.lottery import build
    from sslprune.pruning import SCORES, dense_mask, prunable, prune
    from sslprune.runtime import Runtime
    from sslprune.stacked import Job, train_stacked
    from sslprune.train import train

    exp, _ = resolve({"preset": "demo", "task": "labels", "epochs": epochs})
    data, runtime = load_dataset(exp.data), Runtime(device)

    def jobs(root):
        out = []
        for i in range(k):
            backbone, task = build(exp, data, seed=100 + i, task_name="labels")
            scores = SCORES["random"](prunable(backbone), torch.Generator().manual_seed(i))
            out.append(Job(backbone, task, prune(scores, dense_mask(backbone), 0.5), Path(root) / f"net_{i}", seed=1))
        return out

    def one_by_one(root):
        for j in jobs(root):
            train(j.backbone, j.task, data, exp.train, exp.data, j.mask, j.out, j.seed, runtime, progress=False)

    def stacked(root):
        train_stacked(jobs(root), data, exp.train, exp.data, runtime, progress=False)

    times = {"one by one": [], "stacked": []}
    with tempfile.TemporaryDirectory() as root:
        for rep in range(3):   # alternating; the best of 3 each (the first pays one-off start-up costs)
            for name, way in (("one by one", one_by_one), ("stacked", stacked)):
                t = time.perf_counter()
                way(f"{root}/{name}-{rep}")
                times[name].append(time.perf_counter() - t)
    return {name: min(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--k", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--resnet-k", type=int, nargs="+", default=[4, 8],
                   help="K for ResNet-20 [default: 4 8; memory grows with K: K copies at batch 128 at once]")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU [default: 1, as sweep workers]")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--end-to-end", action="store_true", help="whole re-trainings of the demo (see above)")
    p.add_argument("--epochs", type=int, default=3, help="--end-to-end: epochs per training [default: 3]")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.end_to_end:
        print(f"torch {torch.__version__}, device {args.device}, {args.threads} thread(s); seconds for K whole "
              f"re-trainings of the demo's convnet, {args.epochs} epochs; ratio = one by one / way")
        for k in args.k:
            t = end_to_end(k, args.device, args.epochs)
            print(f"K={k:2d}: " + ", ".join(f"{name} {s:6.1f} s ({t['one by one'] / s:.2f}x)" for name, s in t.items()),
                  flush=True)
        return
    print(f"torch {torch.__version__}, device {args.device}, {args.threads} thread(s); ms per step of all K "
          f"networks (median of {args.repeats}); ratio = one by one / way")
    for model, batch, side in (("convnet", 64, 8), ("resnet20", 128, 32)):
        for k in (args.k if model == "convnet" else args.resnet_k):
            t = measure(model, k, batch, side, args.device, args.repeats)
            base = t["one by one"]
            print(f"{model:9s} K={k:2d} batch {batch}: " + ", ".join(
                f"{name} {1e3 * s:7.1f} ms ({base / s:.2f}x)" for name, s in t.items()), flush=True)


if __name__ == "__main__":
    main()
