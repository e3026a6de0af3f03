"""Who runs a sweep's steps: independent workers that share one run root (processes on this
machine, or SLURM jobs through submitit), and what they did (the ledger, `sslprune sweep --status`).

An evaluation waits until its level is trained. Each step is guarded by an exclusive
`flock` on its own lock file: a worker that cannot take it moves on, and a worker that dies (kill -9
included) loses its locks with its process, so another worker or the next run picks the step up
and resumes it from its last checkpoint. No step is ever computed by two workers at once, and a
finished step is never recomputed (its done.json is checked under the lock). Every worker appends
what it started and finished to ROOT/sweep_ledger.jsonl, which is what `sslprune sweep --status`
and the reuse report read. Locks need a file system with working flock (local disks, NFSv4,
Lustre with flock enabled).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path

from . import layout
from .errors import UserError
from .runtime import Runtime
from .sweep import Spec, Step, Sweep, load_spec

LEDGER = "sweep_ledger.jsonl"


def _progress(train_dir: Path) -> int:
    """Epochs a training run has: all of them when done, else its checkpoint's, else 0."""
    if layout.is_done(train_dir):
        return layout.load_json(train_dir / layout.DONE)["epochs"]
    if (train_dir / layout.CHECKPOINT).exists():  # the epochs a resumed run will not train again
        return int(layout.load_checkpoint(train_dir / layout.CHECKPOINT, mmap=True)["epoch"])
    return 0


def _ledger(root: Path, **entry) -> None:
    """One JSON line per event, appended in a single write (O_APPEND: lines never interleave)."""
    root.mkdir(parents=True, exist_ok=True)
    # cpu: this process's CPU seconds, all its threads: a step's cost when workers share the cores
    line = json.dumps({"time": round(time.time(), 3), "cpu": round(time.process_time(), 3), "pid": os.getpid(),
                       **entry}) + "\n"
    fd = os.open(root / LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def work(specs: str | Path | list, worker: str, poll: float = 0.5, runtime: Runtime | None = None) -> int:
    """Run the steps of one spec or several until none is left; returns the number of steps this
    worker finished. runtime: how steps train (default: the spec's device, the rest automatic)."""
    sweeps = [Sweep(load_spec(Path(p)), runtime, worker) for p in ([specs] if isinstance(specs, (str, Path)) else specs)]
    steps = [(sweep, step) for sweep in sweeps for step in sweep.steps()]
    # every lottery chain before any evaluation, across specs (stable: in spec order otherwise): a
    # chain trains its levels one after the other, so the sooner each starts, the sooner the study
    # can end; evaluations of finished levels fill what the chains leave
    steps.sort(key=lambda pair: pair[1].kind != "lottery")
    finished = 0
    while True:
        pending = [(sweep, s) for sweep, s in steps if not sweep.done(s)]
        if not pending:
            return finished
        progressed = False
        for sweep, step in pending:
            if not sweep.ready(step):
                continue
            with layout.file_lock(sweep.lock(step), wait=False) as mine:
                if not mine or sweep.done(step):    # someone runs it, or finished it meanwhile
                    continue
                key, before = sweep.key(step), sum(_progress(d) for d in sweep.train_dirs(step))
                _ledger(sweep.spec.root, event="start", step=key, worker=worker, epochs_before=before)
                sweep.run(step)
                epochs = sum(_progress(d) for d in sweep.train_dirs(step)) - before
                _ledger(sweep.spec.root, event="done", step=key, worker=worker, epochs=epochs)
                finished += 1
                progressed = True
                break   # look again from the top: a chain no one has started goes first
        if not progressed:
            time.sleep(poll)  # what is left runs elsewhere, or waits for a level being trained


@contextlib.contextmanager
def claim(sweep: Sweep, steps: list[Step], most: int, worker: str):
    """Sweep.claim: the locks of up to `most` of `steps` that no other worker holds and that are not
    done, taken without waiting and held until the block ends; each taken step is in the ledger as
    `worker`'s, started on entering and done on leaving (if it finished)."""
    with contextlib.ExitStack() as held:
        taken = []
        for s in steps:
            if len(taken) >= most:
                break
            if held.enter_context(layout.file_lock(sweep.lock(s), wait=False)) and not sweep.done(s):
                taken.append(s)
        before = {sweep.key(s): sum(_progress(d) for d in sweep.train_dirs(s)) for s in taken}
        for s in taken:
            _ledger(sweep.spec.root, event="start", step=sweep.key(s), worker=worker, epochs_before=before[sweep.key(s)])
        yield taken
        for s in taken:
            if sweep.done(s):
                epochs = sum(_progress(d) for d in sweep.train_dirs(s)) - before[sweep.key(s)]
                _ledger(sweep.spec.root, event="done", step=sweep.key(s), worker=worker, epochs=epochs)


def run_local(specs: Path | list[Path], workers: int, threads: int = 0, runtime: Runtime | None = None,
              wait=None) -> list[int]:
    """`workers` processes on this machine, each running `work` on torch `threads` threads (0: as
    torch chooses); returns their exit codes. wait(procs), if given, runs while they do (progress)."""
    import multiprocessing as mp

    paths = [str(p) for p in ([specs] if isinstance(specs, (str, Path)) else specs)]
    ctx = mp.get_context("spawn")
    gpus = worker_gpus(workers, (runtime or Runtime()).device)
    procs = [ctx.Process(target=_worker_main, args=(paths, f"local-{i}", threads, runtime, gpus[i]), name=f"sweep-{i}")
             for i in range(workers)]
    for p in procs:
        p.start()
    if wait is not None:
        wait(procs)
    for p in procs:
        p.join()
    return [p.exitcode for p in procs]


def worker_gpus(workers: int, device: str) -> list[str | None]:
    """The GPU each local worker sees (its CUDA_VISIBLE_DEVICES), in turn over the GPUs this process
    sees, when steps train on 'cuda' and more than one is visible; None: the worker sees what this
    process does (CPU, one GPU, or a device named by number, 'cuda:1', which stays as asked)."""
    if device != "cuda":
        return [None] * workers
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        import torch
        gpus = [str(i) for i in range(torch.cuda.device_count())]
    else:  # indices or UUIDs, as the user gave them
        gpus = [g.strip() for g in visible.split(",") if g.strip()]
    return [gpus[i % len(gpus)] for i in range(workers)] if len(gpus) > 1 else [None] * workers


def _worker_main(specs: list[str], worker: str, threads: int = 0, runtime: Runtime | None = None,
                 gpu: str | None = None) -> None:
    import sys
    if gpu is not None:  # before this process touches CUDA: 'cuda' is then this one GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    if threads:   # small networks: one thread per worker, workers side by side, rather than threads fighting
        import torch
        torch.set_num_threads(threads)
    try:
        work(specs, worker, runtime=runtime)
    except UserError as e:
        print(f"sslprune sweep: worker {worker}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C reaches every worker: the parent says it once
        sys.exit(130)


def submit(specs: Path | list[Path], workers: int, cluster: str, folder: Path, slurm: dict,
           runtime: Runtime | None = None) -> list:
    """`workers` jobs through submitit (cluster 'slurm', or 'local' to run them as local processes);
    returns the jobs. Each job runs `work` on every spec; together they finish the sweep(s)."""
    paths = [str(p) for p in ([specs] if isinstance(specs, (str, Path)) else specs)]
    try:
        import submitit
    except ImportError:
        raise UserError("--submit needs submitit: pip install 'sslprune[cluster]'") from None
    if cluster == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):  # before submitit writes anything
        raise UserError("--submit slurm needs SLURM's sbatch and srun on this machine (not on the PATH); run the command "
                        "on the cluster's login node, or use --workers N without --submit here")
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = {"timeout_min": slurm.get("time", 60)}
    if cluster == "slurm":
        params |= {k: v for k, v in {"slurm_partition": slurm.get("partition"),
                                     "gpus_per_node": slurm.get("gpus_per_node"),
                                     "cpus_per_task": slurm.get("cpus_per_task")}.items() if v is not None}
    executor.update_parameters(**params)
    with executor.batch():
        jobs = [executor.submit(work, paths, f"{cluster}-{i}", runtime=runtime) for i in range(workers)]
    return jobs


def status(spec: Spec) -> dict:
    """Steps done and pending, and the epochs the sweep trained against what it would have
    trained without reuse: each re-training of level L would re-run its own lottery levels 0..L
    (the dense training and rewind point included), as separate experiments do."""
    sweep = Sweep(spec)
    steps = sweep.steps()
    done = [s for s in steps if sweep.done(s)]
    ledger = _read_ledger(spec.root)
    # epochs trained by the sweep: each finished step's epochs, less those it had when first started
    # (a worker killed mid-step is credited through the checkpoint its successor resumed from)
    first = {}
    for e in ledger:
        if e["event"] == "start":
            first.setdefault(e["step"], e["epochs_before"])
    ran = sum(sum(_progress(d) for d in sweep.train_dirs(s)) - first[sweep.key(s)] for s in done if sweep.key(s) in first)
    without = ran + sum(s.experiment.train.epochs * (s.level + 1) for s in done if s.level >= 0)
    keys = {sweep.key(s) for s in steps}   # the ledger is the root's: other specs' steps are theirs
    twice = [k for k in finished_twice(ledger) if k in keys]
    started = {e["step"]: e["time"] for e in ledger if e["event"] == "start"}   # the latest start of each
    running = [{"step": sweep.key(s), "since": started.get(sweep.key(s)), "at": _where(sweep, s)}
               for s in steps if not sweep.done(s) and layout.lock_held(sweep.lock(s))]
    return {"steps": len(steps), "done": len(done), "pending": [sweep.key(s) for s in steps if not sweep.done(s)],
            "running": running,
            "epochs_trained": ran, "epochs_without_reuse": without, "finished_twice": twice,
            "worker_seconds": busy_seconds(ledger, keys),
            "worker_cpu_seconds": busy_seconds(ledger, keys, clock="cpu")}   # None: not logged for every step


def busy_seconds(ledger: list[dict], keys: set[str], clock: str = "time") -> float | None:
    """Seconds workers spent on the finished attempts at these steps, summed over workers: what a
    sweep cost. clock 'time': wall time (GPU-hours with a GPU a worker); 'cpu': the workers' own CPU
    time (their processes', DataLoader workers not included), which holds when they share the cores;
    None when a finished attempt was logged without it (before it was logged): never a part as the whole.
    A worker's steps that overlap (a stack claims several at once) count once; an attempt cut short
    (a killed worker) has no 'done' and is not counted, its successor is."""
    spans, began = {}, {}  # (worker, pid) -> [(wall start, wall end, clock start, clock end)]
    for e in ledger:
        if e["step"] not in keys:
            continue  # another spec sharing the run root
        who = (e.get("worker"), e["pid"], e["step"])
        if e["event"] == "start":
            began[who] = e
        elif who in began:
            s = began.pop(who)
            if clock not in s or clock not in e:
                return None
            spans.setdefault(who[:2], []).append((s["time"], e["time"], s[clock], e[clock]))
    total = 0.0
    for intervals in spans.values():
        # steps overlapping in wall time ran in one process (a pid is not reused while its process
        # lives), so each overlapping group costs its clock's span, which holds for the CPU clock too
        group = None
        for w0, w1, c0, c1 in sorted(intervals) + [(math.inf,) * 4]:
            if group and w0 <= group[1]:
                group = [group[0], max(group[1], w1), min(group[2], c0), max(group[3], c1)]
                continue
            total += group[3] - group[2] if group else 0.0
            group = [w0, w1, c0, c1]
    return total


def cost(root: Path, experiment: str) -> tuple[float, float | None] | None:
    """What the finished sweep steps of one experiment under `root` took, from the ledger: (worker
    seconds, workers' CPU seconds or None where not logged); None when no sweep ran it."""
    ledger = _read_ledger(root)
    keys = {e["step"] for e in ledger if e["step"].split("/", 1)[0] == experiment}  # Sweep.key's first part
    if not keys:
        return None
    return busy_seconds(ledger, keys), busy_seconds(ledger, keys, clock="cpu")


def finished_twice(ledger: list[dict]) -> list[str]:
    """Steps some of whose work was done twice: a finished attempt that started with fewer epochs
    than an earlier finished one had left, or any second finish of a step that trains no epochs (a
    probe). A lottery chain shared by two specs with different levels (a rewind study's 1-epoch chain,
    to level 12, is the labels study's, to level 30) is finished by each in turn, the second going on
    from where the first stopped: that is no repeat."""
    began, had, twice = {}, {}, set()   # had: epochs a step had when an attempt last finished it
    for e in ledger:
        who = (e.get("worker"), e["pid"], e["step"])
        if e["event"] == "start":
            began[who] = e
        elif who in began:
            before = began.pop(who)["epochs_before"]
            if e["step"] in had and (before < had[e["step"]] or had[e["step"]] == 0):
                twice.add(e["step"])
            had[e["step"]] = max(had.get(e["step"], 0), before + e["epochs"])
    return sorted(twice)


def _where(sweep: Sweep, step: Step) -> str | None:
    """How far a running step is: its first unfinished training, within the replicate, and the last
    epoch it saved, e.g. level_6/train, epoch 9 saved (None: no training of its own under way yet,
    or none at all, e.g. a probe)."""
    replicate = layout.replicate_dir(sweep.spec.root / step.experiment.name(), step.replicate)
    for d in sweep.train_dirs(step):
        if not layout.is_done(d):
            try:
                return f"{d.relative_to(replicate)}, epoch {_progress(d)} saved"
            except UserError:  # being replaced as we read it, or damaged: the worker will say
                return f"{d.relative_to(replicate)}, checkpoint unreadable"
    return None


def _read_ledger(root: Path) -> list[dict]:
    path = root / LEDGER
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line cut short (a full disk): left out, never a traceback
            continue
        if isinstance(entry, dict) and {"step", "event", "pid", "time"} <= entry.keys():
            out.append(entry)
    return out
