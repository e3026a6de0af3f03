"""One run on 2 CPU processes (torchrun, gloo) against the same run on one process."""
import os
import subprocess
import sys

import pytest
import torch

from sslprune import layout
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


def test_two_processes_match_one_with_the_same_global_batch(runs):
    tmp, one, two = runs
    assert two.stdout.strip().count("\n") == one.stdout.strip().count("\n")   # rank 0 alone prints
    (a,), (b,) = list((tmp / "one").iterdir()), list((tmp / "two").iterdir())
    assert a.name == b.name                                   # the same experiment
    wa = layout.load_tensors(layout.level_dir(a, 1, 0) / "train" / layout.MODEL)
    wb = layout.load_tensors(layout.level_dir(b, 1, 0) / "train" / layout.MODEL)
    assert wa.keys() == wb.keys()
    init = layout.load_tensors(layout.replicate_dir(a, 1) / layout.INIT)
    for k in wa:  # float32 rounding differs (sums split in two), and training amplifies it a little
        if wa[k].is_floating_point():
            moved = float((wa[k] - init[k]).abs().max())
            diff = float((wa[k] - wb[k]).abs().max())
            assert diff <= 1e-5 + 1e-2 * moved, k
    ma = layout.load_tensors(layout.level_dir(a, 1, 1) / layout.MASK)
    mb = layout.load_tensors(layout.level_dir(b, 1, 1) / layout.MASK)
    assert abs(density(mb) - 0.8) < 1e-3
    same = sum(int((ma[n] == mb[n]).sum()) for n in ma) / sum(m.numel() for m in ma.values())
    assert same > 0.999                                       # only near-ties may differ
    # nothing written twice or left behind by the other rank
    assert not list(b.rglob("*.tmp")) and not list(b.rglob(layout.CHECKPOINT))


def test_a_distributed_run_resumes_and_refuses_coupled_objectives(runs):
    tmp, _, _ = runs
    more = _sslprune(tmp / "two", 2, "--levels", "2")        # levels 0-1 are loaded, level 2 trained
    assert more.returncode == 0, more.stderr[-2000:]
    (b,) = list((tmp / "two").iterdir())
    assert layout.is_done(layout.level_dir(b, 1, 2) / "train")
    bad = _sslprune(tmp / "bad", 2, "--task", "npid")
    assert bad.returncode != 0 and "does not run on several processes yet" in bad.stderr
    assert not (tmp / "bad").exists()


def _grads_on_two_ranks(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from sslprune import distributed
    from sslprune.models import build_model
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(build_model("convnet"), torch.nn.Linear(128, 10)).double().train()
    x, y = torch.randn(32, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (32,))
    distributed.sync_batchnorm(model)
    idx, xs = distributed.shard(torch.arange(32), x)
    torch.nn.functional.cross_entropy(model(xs), y[idx]).backward()
    distributed.average_gradients(list(model.parameters()))
    if rank == 0:
        torch.save({"grads": {n: p.grad for n, p in model.named_parameters()},
                    "state": model.state_dict()}, out)
    dist.barrier()
    dist.destroy_process_group()


def test_synchronised_batchnorm_and_averaged_gradients_are_the_full_batch_ones(tmp_path):
    """In float64, one step on two half batches gives the gradients and batch-norm running
    statistics of one step on the whole batch, to rounding."""
    import socket

    import torch.multiprocessing as mp

    from sslprune.models import build_model
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_grads_on_two_ranks, args=(port, str(tmp_path / "g.pt")), nprocs=2)
    got = torch.load(tmp_path / "g.pt", weights_only=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(build_model("convnet"), torch.nn.Linear(128, 10)).double().train()
    x, y = torch.randn(32, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (32,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(got["grads"][n], p.grad, atol=1e-12, rtol=1e-9), n
    for n, v in model.state_dict().items():
        assert torch.allclose(got["state"][n].double(), v.double(), atol=1e-12), n
