"""The GPU check: every CUDA path of sslprune exercised in a few minutes on one GPU, one table.

    bash benchmarks/gpu_check.sh                      # on the GPU machine (--device cuda)
    python benchmarks/gpu_check.py --device cpu --quick   # the same checks on a CPU, tiny (to test this script)

Each check is a separate process (the CLI as a user runs it), so one failure is a row of the table,
not the end of the check. Rows: every objective for a few steps (in-memory data on the device,
bf16 autocast where the device has it, channels_last), torch.compile, --accumulate, a ResNet-18 (CIFAR) lottery
killed mid-run and resumed, a streamed ImageFolder run (pinned memory, loader workers), the measured
cost of its levels (CUDA latency next to CPU), benchmarks/train_speed.py at batch 512 (our loop
against a bare loop, the data pipeline against training), a small study by 1 worker, 2 workers and
1 worker with --stack 3, and benchmarks/many_networks.py (stacked networks against one at a time). Writes the table (gpu_check.md) and every
command's output (gpu_check.log) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CIFAR = HERE.parents[1] / "shared/data/cifar10-images/cifar10-images.tar.gz"
OBJECTIVES = {"labels": [], "rotation": [], "exemplar": [], "npid": ["--nce-negatives", "512", "--knn", "50"],
              "s4l": ["--label-fraction", "0.1"], "vicreg": ["--projector-dim", "512"]}


class Check:
    def __init__(self, args):
        self.args, self.rows, self.log = args, [], []
        self.root = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def sslprune(self, *argv: str, timeout: float = 300, kill_after: float | None = None) -> tuple[int, str, float]:
        """Run `python -m sslprune argv`; kill_after: SIGKILL it after that many seconds (a crash)."""
        cmd = [sys.executable, "-m", "sslprune", *argv]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=kill_after if kill_after is not None else timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            out += f"\n[killed after {time.perf_counter() - t0:.0f} s]"
        seconds = time.perf_counter() - t0
        self.log.append(f"$ {' '.join(cmd)}\n{out}\n[exit {proc.returncode}, {seconds:.1f} s]\n")
        return proc.returncode, out, seconds

    def row(self, check: str, ok: bool | None, seconds: float, measured: str) -> None:
        """ok None: nothing to run yet."""
        result = {True: "ok", False: "FAILED", None: "-"}[ok]
        self.rows.append((check, result, f"{seconds:.1f}", measured))
        print(f"{result:6} {check:48} {seconds:7.1f} s  {measured}", flush=True)

    def table(self) -> str:
        lines = ["| check | result | seconds | measured |", "|---|---|---|---|"]
        return "\n".join(lines + [f"| {' | '.join(r)} |" for r in self.rows]) + "\n"


def _done(exp_dir: Path, level: int = 0) -> dict:
    return json.loads((exp_dir / f"replicate_1/level_{level}/train/done.json").read_text())


def _experiment(out: str) -> Path:
    return Path(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--cifar", type=Path, default=CIFAR, help="CIFAR-10 ImageFolder .tar.gz [default: "
                   "../shared/data's; digits at 32 px when absent]")
    p.add_argument("--quick", action="store_true", help="tiny sizes: test this script on a CPU")
    p.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    args = p.parse_args()
    c = Check(args)
    dev, quick = args.device, args.quick
    precision = "bf16" if dev.startswith("cuda") else "fp32"
    import torch
    name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") and torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__}, device {dev} ({name}), precision {precision}", flush=True)
    base = ["--dataset", "digits", "--model", "convnet", "--optimizer", "adam", "--lr", "2e-3", "--batch-size", "64",
            "--device", dev, "--precision", precision, "--quiet", "--replicates", "1"]

    # 1. every objective's path on the device, a lottery of two levels each
    for task, extra in OBJECTIVES.items():
        rc, out, s = c.sslprune("lottery", *base, "--task", task, *extra, "--epochs", "1" if quick else "3",
                                "--levels", "1", "--root", str(c.root / "objectives"))
        ok = rc == 0
        c.row(f"{task}: lottery, 2 levels, {precision}, channels_last", ok, s,
              f"test acc {_done(_experiment(out), 1)['test_acc']:.3f}" if ok else out.strip().splitlines()[-1][:120])

    # 2. torch.compile
    rc, out, s = c.sslprune("lottery", *base, "--task", "rotation", "--epochs", "2", "--levels", "0", "--compile",
                            "--root", str(c.root / "compile"))
    c.row("rotation: torch.compile", rc == 0, s, f"test acc {_done(_experiment(out))['test_acc']:.3f}" if rc == 0
          else out.strip().splitlines()[-1][:120])

    # 2b. --accumulate on the device (bf16 parts summed in fp32 .grad)
    rc, out, s = c.sslprune("lottery", *base, "--task", "rotation", "--epochs", "2", "--levels", "0", "--accumulate", "4",
                            "--root", str(c.root / "accumulate"))
    c.row("rotation: --accumulate 4", rc == 0, s, f"test acc {_done(_experiment(out))['test_acc']:.3f}" if rc == 0
          else out.strip().splitlines()[-1][:120])

    # 3. ResNet-18 (CIFAR) lottery, killed mid-run and resumed
    data = (["--dataset", "imagefolder", "--data-root", str(args.cifar), "--train-per-class", "50" if quick else "1000",
             "--test-per-class", "10" if quick else "100"] if args.cifar.exists() else
            ["--dataset", "digits", "--image-size", "32"])
    model = "convnet" if quick else "resnet18_cifar"
    flags = ["lottery", *data, "--model", model, "--task", "rotation", "--optimizer", "adam", "--lr", "1e-3",
             "--batch-size", "64" if quick else "512", "--epochs", "2" if quick else "6", "--levels", "1",
             "--rewind", "1ep", "--crop-pad", "2", "--flip", "--device", dev, "--precision", precision, "--quiet",
             "--root", str(c.root / "resume")]
    rc1, _, s1 = c.sslprune(*flags, kill_after=20 if quick else 40)
    rc2, out, s2 = c.sslprune(*flags)
    ok = rc1 == -signal.SIGKILL and rc2 == 0   # killed mid-run (not finished early), then finished
    exp = _experiment(out) if ok else None
    c.row(f"{model} lottery: SIGKILL at {s1:.0f} s, then resumed", ok, s1 + s2,
          (f"killed: exit {rc1}; level 1 test rotation acc {_done(exp, 1)['test_acc']:.3f}" if ok
           else out.strip().splitlines()[-1][:120]))

    # 4. what its levels cost: MACs, and latency on the device against the CPU
    if exp is not None:
        rc, out, s = c.sslprune("eval", "cost", str(exp), "--repeats", "3" if quick else "10", "--no-onnx")
        speed = ""
        if rc == 0:  # the dense network's latency on each engine (a weight mask changes no kernel)
            dense = json.loads((exp / "replicate_1/level_1/cost.json").read_text())["dense"]["seconds"]
            speed = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in sorted(dense.items()))
        c.row("eval cost: dense latency per engine", rc == 0, s, speed[:300] if rc == 0
              else out.strip().splitlines()[-1][:120])

    # 4b. linear-mode connectivity of level 1's ticket (a second copy trained, 11 points on the path)
    if exp is not None:
        rc, out, s = c.sslprune("eval", "stability", str(exp), "--level", "1", "--device", dev, "--precision",
                                precision, "--quiet", "--points", "5" if quick else "11")
        c.row("eval stability (level 1)", rc == 0, s, out.strip().splitlines()[-1][:200] if out.strip() else "")

    # 5. a streamed ImageFolder run: decoding workers, pinned memory
    tree = c.root / "tree"
    _write_tree(tree, classes=4, per_class=16 if quick else 64, size=40)
    rc, out, s = c.sslprune("lottery", "--dataset", "imagefolder", "--data-root", str(tree), "--stream",
                            "--image-size", "32", "--model", "convnet", "--task", "rotation", "--optimizer", "adam",
                            "--lr", "1e-3", "--batch-size", "32", "--epochs", "2", "--levels", "0", "--device", dev,
                            "--precision", precision, "--loader-workers", "2", "--quiet", "--root", str(c.root / "stream"))
    c.row("streamed ImageFolder (2 loader workers, pinned)", rc == 0, s,
          f"test acc {_done(_experiment(out))['test_acc']:.3f}" if rc == 0 else out.strip().splitlines()[-1][:120])

    # 6. our loop against a bare loop, the data pipeline against training (train_speed.py)
    speed = [sys.executable, str(HERE / "train_speed.py"), "--device", dev, "--models",
             *(["convnet"] if quick else ["resnet20", "resnet18_cifar"]), "--batches", "64" if quick else "512",
             "--steps", "2" if quick else "8", "--rounds", "1" if quick else "2"]
    t0 = time.perf_counter()
    r = subprocess.run(speed, capture_output=True, text=True, env=c.env, timeout=600)
    s = time.perf_counter() - t0
    c.log.append(f"$ {' '.join(speed)}\n{r.stdout}{r.stderr}\n[exit {r.returncode}, {s:.1f} s]\n")
    keep = [line.strip() for line in r.stdout.splitlines() if "overhead" in line or "data pipeline" in line
            or line.startswith(("convnet,", "resnet20,", "resnet18_cifar,"))]
    c.row("train_speed.py: loop vs bare loop, pipeline", r.returncode == 0, s,
          " / ".join(keep)[:400] if r.returncode == 0 else (r.stderr.strip().splitlines() or ["?"])[-1][:120])

    # 7. a small study three ways: one worker, two workers side by side, one worker stacking a level's
    # three re-trainings (--stack 3); the same steps, wall-clock compared
    spec = c.root / "study.toml"
    spec.write_text(f'root = "study"\nlevels = {1 if quick else 2}\nreplicates = 2\ndevice = "{dev}"\n[base]\n'
                    f'preset = "demo"\ntask = "labels"\nepochs = {1 if quick else 3}\n'
                    f'[evaluations]\nretrain = ["rewind", "reinit", "random"]\n')
    ways, times = (("1 worker", ["--workers", "1"]), ("2 workers", ["--workers", "2"]),
                   ("1 worker, --stack 3", ["--workers", "1", "--stack", "3"])), {}
    for label, flags in ways:
        shutil.rmtree(c.root / "study", ignore_errors=True)
        rc, out, times[label] = c.sslprune("sweep", str(spec), *flags, timeout=600)
        if rc != 0:
            break
    c.row("a study: 2 workers, --stack 3 against 1 worker", rc == 0, sum(times.values()),
          ", ".join(f"{k} {v:.0f} s ({times['1 worker'] / v:.2f}x)" for k, v in times.items()) if rc == 0
          else out.strip().splitlines()[-1][:120])

    # 8. many networks per step: --stack's way against one at a time, step by step and whole trainings
    for label, extra in (("per step", ["--k", "4", "8", "16", "--resnet-k", "4", "8", "16", "--repeats", "10"]),
                         ("whole re-trainings", ["--end-to-end", "--k", "4", "8", "16"])):
        cmd = [sys.executable, str(HERE / "many_networks.py"), "--device", dev, *extra]
        if quick:
            cmd = [*cmd[:4], *(["--end-to-end", "--epochs", "1"] if "--end-to-end" in extra else
                               ["--resnet-k", "2", "--repeats", "2"]), "--k", "2"]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=c.env, timeout=600)
        s = time.perf_counter() - t0
        c.log.append(f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}\n[exit {r.returncode}, {s:.1f} s]\n")
        keep = [line.strip() for line in r.stdout.splitlines() if line.startswith(("convnet", "resnet20", "K="))]
        c.row(f"many_networks.py: stacked vs one by one, {label}", r.returncode == 0, s,
              " / ".join(keep)[:700] if r.returncode == 0 else (r.stderr.strip().splitlines() or ["?"])[-1][:120])

    args.out.mkdir(parents=True, exist_ok=True)
    header = f"torch {torch.__version__}, device {dev} ({name}), precision {precision}\n\n"
    (args.out / "gpu_check.md").write_text(header + c.table())
    (args.out / "gpu_check.log").write_text("\n".join(c.log))
    print("\n" + header + c.table())
    shutil.rmtree(c.root, ignore_errors=True)


def _write_tree(root: Path, classes: int, per_class: int, size: int) -> None:
    """A small ImageFolder of JPEGs (train/ and test/), classes told apart by colour."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", max(4, per_class // 4))):
        for k in range(classes):
            d = root / split / f"class{k}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
                img[..., k % 3] += 120
                Image.fromarray(img).save(d / f"{i}.jpg", quality=90)


if __name__ == "__main__":
    main()
