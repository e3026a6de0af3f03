"""One run on 2 CPU processes (torchrun, gloo) against the same run on one process."""
import os
import subprocess
import sys

import pytest
import torch

from sslprune import distributed, layout
from sslprune.pruning import density

FLAGS = ["lottery", "--preset", "demo", "--task", "rotation", "--train-per-class", "40", "--test-per-class", "10",
         "--epochs", "2", "--batch-size", "32", "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--levels", "1", "--replicates", "1", "--quiet"]


def _sslprune(root, nproc: int, *extra) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*(launcher if nproc > 1 else [sys.executable]), "-m", "sslprune", *FLAGS,
                           "--root", str(root), *extra], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    one, two = _sslprune(tmp / "one", 1), _sslprune(tmp / "two", 2)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    return tmp, one, two


def _same_training(a, b) -> None:
    """Level 0 of experiment folders a and b: the same weights, to float32 rounding."""
    wa = layout.load_tensors(layout.level_dir(a, 1, 0) / "train" / layout.MODEL)
    wb = layout.load_tensors(layout.level_dir(b, 1, 0) / "train" / layout.MODEL)
    assert wa.keys() == wb.keys()
    init = layout.load_tensors(layout.replicate_dir(a, 1) / layout.INIT)
    for k in wa:  # float32 rounding differs (sums split in two), and training amplifies it a little
        if wa[k].is_floating_point():
            moved = float((wa[k] - init[k]).abs().max())
            diff = float((wa[k] - wb[k]).abs().max())
            assert diff <= 1e-5 + 1e-2 * moved, k


def test_two_processes_match_one_with_the_same_global_batch(runs):
    tmp, one, two = runs
    assert two.stdout.strip().count("\n") == one.stdout.strip().count("\n")   # rank 0 alone prints
    (a,), (b,) = list((tmp / "one").iterdir()), list((tmp / "two").iterdir())
    assert a.name == b.name                                   # the same experiment
    _same_training(a, b)
    ma = layout.load_tensors(layout.level_dir(a, 1, 1) / layout.MASK)
    mb = layout.load_tensors(layout.level_dir(b, 1, 1) / layout.MASK)
    assert abs(density(mb) - 0.8) < 1e-3
    same = sum(int((ma[n] == mb[n]).sum()) for n in ma) / sum(m.numel() for m in ma.values())
    assert same > 0.999                                       # only near-ties may differ
    # nothing written twice or left behind by the other rank
    assert not list(b.rglob("*.tmp")) and not list(b.rglob(layout.CHECKPOINT))


def test_a_distributed_run_resumes(runs):
    tmp, _, _ = runs
    more = _sslprune(tmp / "two", 2, "--levels", "2")        # levels 0-1 are loaded, level 2 trained
    assert more.returncode == 0, more.stderr[-2000:]
    (b,) = list((tmp / "two").iterdir())
    assert layout.is_done(layout.level_dir(b, 1, 2) / "train")
    bad = _sslprune(tmp / "bad", 2, "--batch-size", "33")
    assert bad.returncode != 0 and "does not divide by the 2 processes" in bad.stderr
    assert not (tmp / "bad").exists()


def test_accumulated_parts_are_the_same_on_two_processes(tmp_path):
    """--accumulate 2 on two processes: each takes half of each part, so synchronised batch-norm
    normalises the same 16 images as one process does; the weights match the one-process run's.
    Without that interleaving each rank's first part would be another set of images."""
    one = _sslprune(tmp_path / "one", 1, "--accumulate", "2", "--levels", "0")
    two = _sslprune(tmp_path / "two", 2, "--accumulate", "2", "--levels", "0")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    (a,), (b,) = list((tmp_path / "one").iterdir()), list((tmp_path / "two").iterdir())
    assert a.name == b.name and "accumulate" in (a / layout.CONFIG).read_text()
    _same_training(a, b)
    bad = _sslprune(tmp_path / "bad", 2, "--accumulate", "4", "--batch-size", "36")
    assert bad.returncode != 0 and "pass a --batch-size that divides by 8" in bad.stderr
    assert not (tmp_path / "bad").exists()


TASK_OPTIONS = {"labels": {}, "rotation": {}, "exemplar": {"embedding_dim": 8},
                "npid": {"embedding_dim": 8, "nce_negatives": 16}, "s4l": {}, "vicreg": {"projector_dim": 16},
                "vicreg-gated": {"projector_dim": 16, "budget": 0.5}}   # a gated ResNet-20, VICReg-Dual


def _one_step(name: str, rows_of=None) -> dict:
    """One float64 training step of task `name` on a fixed batch of 16 images; rows_of(B) gives
    this process's rows (None: all). Returns the gradients and the state after it."""
    from sslprune.config import Task as TaskConfig
    from sslprune.data.augment import Normalize
    from sslprune.models import build_model
    from sslprune.tasks import UNLABELLED, Batch, build_task
    from sslprune.train import TrainingStep
    torch.manual_seed(0)
    gated = name.endswith("-gated")
    backbone = (build_model("resnet20", gated=True) if gated else torch.nn.Sequential(build_model("convnet"))).double().train()
    task = build_task(TaskConfig(task=name.removesuffix("-gated"), **TASK_OPTIONS[name]), 64 if gated else 128, 10, 64)
    task = task.double().train()
    if rows_of is not None:
        distributed.sync_batchnorm(backbone), distributed.sync_batchnorm(task)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (16,), generator=g)
    if name == "s4l":                      # the paired layout: labelled half, then unlabelled half
        labels[8:] = UNLABELLED
    index = torch.randperm(64, generator=g)[:16]
    normalize = Normalize(torch.full((3,), 0.5), torch.full((3,), 0.25))
    params = [*backbone.parameters(), *task.parameters()]
    batch = Batch(images, labels, index, torch.Generator().manual_seed(2), rows_of and rows_of(16))
    step = TrainingStep(backbone, task)        # as train() runs it: under DDP on two processes
    step = distributed.data_parallel(step, "cpu") if rows_of else step     # (kept alive until backward)
    loss, correct, n = step(batch, lambda x: normalize(x).double())
    loss.backward()
    correct, n = distributed.sum_over_ranks(correct, torch.tensor(n)) if rows_of else (correct, n)
    names = [f"backbone.{k}" for k, _ in backbone.named_parameters()] + [f"task.{k}" for k, _ in task.named_parameters()]
    return {"grads": {k: p.grad for k, p in zip(names, params)},
            "state": {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                      **{f"task.{k}": v for k, v in task.state_dict().items()}},
            "loss": loss.detach(), "correct": int(correct), "n": int(n)}


def _steps_on_two_ranks(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    distributed.init("cpu")
    got = {name: _one_step(name, distributed.rows) for name in TASK_OPTIONS}
    if rank == 0:
        torch.save(got, out)
    dist.barrier()
    dist.destroy_process_group()


def test_every_objective_on_two_processes_takes_the_one_process_step(tmp_path):
    """In float64, one step on two half batches (synchronised batch-norm, gathered embeddings,
    NPID's shared bank, S4L's labelled images all on rank 0) gives the gradients, batch-norm
    statistics, memory bank and metrics of one step on the whole batch, to rounding. Rank 1's
    result: the per-rank losses differ (per-image objectives), but the averaged gradients match."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_steps_on_two_ranks, args=(port, str(tmp_path / "g.pt")), nprocs=2)
    got = torch.load(tmp_path / "g.pt", weights_only=True)
    for name in TASK_OPTIONS:
        want = _one_step(name)
        for k, g in want["grads"].items():
            assert (g is None) == (got[name]["grads"][k] is None), (name, k)
            if g is not None:
                assert torch.allclose(got[name]["grads"][k], g, atol=1e-12, rtol=1e-9), (name, k)
        for k, v in want["state"].items():
            assert torch.allclose(got[name]["state"][k].double(), v.double(), atol=1e-12), (name, k)
        assert (got[name]["correct"], got[name]["n"]) == (want["correct"], want["n"]), name
        if name == "exemplar":  # a loss over the whole batch: the same on every rank
            assert torch.allclose(got[name]["loss"], want["loss"], atol=1e-12), name


@pytest.mark.parametrize("task", ["exemplar", "npid", "streamed"])
def test_objectives_that_couple_the_batch_train_on_two_processes(tmp_path, task):
    """End to end through torchrun: the gathered objectives, and images streamed from disk (each
    process decodes its rows, then gathers them), give the one-process weights."""
    extra = ("--task", task, "--levels", "0", "--epochs", "1",
             *(("--nce-negatives", "64") if task == "npid" else ()))
    if task == "streamed":
        from .test_stream import write_tree
        extra = ("--task", "exemplar", "--levels", "0", "--epochs", "2", "--dataset", "imagefolder",
                 "--data-root", str(write_tree(tmp_path / "tree")), "--stream", "--image-size", "16",
                 "--crop-pad", "0", "--loader-workers", "1", "--batch-size", "24")  # all 24 images
    one, two = _sslprune(tmp_path / "one", 1, *extra), _sslprune(tmp_path / "two", 2, *extra)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    (a,), (b,) = list((tmp_path / "one").iterdir()), list((tmp_path / "two").iterdir())
    wa = layout.load_tensors(layout.level_dir(a, 1, 0) / "train" / layout.MODEL)
    wb = layout.load_tensors(layout.level_dir(b, 1, 0) / "train" / layout.MODEL)
    init = layout.load_tensors(layout.replicate_dir(a, 1) / layout.INIT)
    for k in wa:
        if wa[k].is_floating_point():
            ref = init[k] if k in init else wa[k]       # the NPID bank is not in the init file's backbone
            moved = float((wa[k] - ref).abs().max())
            assert float((wa[k] - wb[k]).abs().max()) <= 1e-5 + 1e-2 * max(moved, 1e-3), (task, k)


def test_vicreg_dual_trains_under_torchrun(tmp_path):
    """VICReg-Dual through torchrun: the first step's loss is the one-process loss (same gates, the
    budget losses on the whole batch), and the run records its realised MACs. Weights are not
    compared: with hard gates a float32 run is chaotic. One pre-activation within 1e-6 of zero
    changes sides under another summation order (measured: one element of 8192 after one step),
    and gradients through the gates follow; one process on 1 and on 2 threads differs as much as
    1 and 2 processes. The float64 step-level test above is the equivalence test."""
    extra = ("--task", "vicreg", "--budget", "0.4", "--model", "resnet20", "--projector-dim", "32",
             "--levels", "0", "--epochs", "1", "--train-per-class", "4")   # 40 images: one step of 32
    one, two = _sslprune(tmp_path / "one", 1, *extra), _sslprune(tmp_path / "two", 2, *extra)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    (a,), (b,) = list((tmp_path / "one").iterdir()), list((tmp_path / "two").iterdir())
    da, db = (layout.load_json(layout.level_dir(d, 1, 0) / "train" / layout.DONE) for d in (a, b))
    assert da["step"] == db["step"] == 1
    assert abs(da["train_loss"] - db["train_loss"]) <= 1e-5 * abs(da["train_loss"])
    assert 0 < db["test_macs"] < 1 and abs(da["test_macs"] - db["test_macs"]) < 0.05
