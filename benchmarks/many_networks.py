"""Many small networks per step (issue "A study's wall-clock", part 2): does training K networks of
the same shape in one step beat training them one after another, on this machine?

Each network gets its own weights, batch and labels (as the re-trainings of a level would), Adam,
cross-entropy on a 10-way head; a step of all K is timed three ways, in one run:
    one by one   K ordinary steps, one network after the other
    vmap         torch.func: functional_call + vmap(grad) over stacked parameters and buffers
    grouped      the K networks as one with groups=K convolutions and a batched head (convnet only)
Ratios are "one by one / way": above 1, stacking pays.

    python benchmarks/many_networks.py                       # the demo's convnet (8x8) and ResNet-20 (32x32)
    python benchmarks/many_networks.py --device cuda         # when a GPU is there
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from sslprune.models import build_model


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

    params, buffers = stack_module_state(nets)     # (K, ...) copies
    base = copy.deepcopy(nets[0]).to("meta")

    def loss_of(p, b, xi, yi):
        return nn.functional.cross_entropy(functional_call(base, (p, b), (xi,)), yi)

    grads_of = vmap(grad_and_value(loss_of), randomness="different")
    stacked = torch.optim.Adam(params.values(), lr=1e-3)   # elementwise: K Adams in one

    def vmapped():
        grads, _ = grads_of(params, buffers, x, y)
        for name, p in params.items():
            p.grad = grads[name]
        stacked.step()

    out = {"one by one": timed(one_by_one, repeats), "vmap": timed(vmapped, repeats)}
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
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--k", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--resnet-k", type=int, nargs="+", default=[4, 8],
                   help="K for ResNet-20 (vmap of 16 at batch 128 ended without output here: killed for memory)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU [default: 1, as sweep workers]")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
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
