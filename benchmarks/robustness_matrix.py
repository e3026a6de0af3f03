"""The "nothing silently wrong" matrix, run as a user would (the CLI, in subprocesses, on digits).

Each case is a command line and the outcome it must have: exit code 2 with exactly one line on
stderr, or success with a stated property. Prints one row per case and the totals: cases tried,
cases ending in one clear line, mismatches.

    python benchmarks/robustness_matrix.py [--root DIR]
"""
from __future__ import annotations

import argparse
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

CLI = [sys.executable, "-m", "sslprune"]
F = ["--dataset", "digits", "--model", "convnet", "--task", "labels", "--batch-size", "64", "--crop-pad", "1",
     "--rewind", "1ep", "--replicates", "1", "--quiet"]
GOOD = [*F, "--optimizer", "adam", "--lr", "2e-3", "--epochs", "1"]


def run(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd)


def one_line(p: subprocess.CompletedProcess) -> bool:
    return p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("sslprune: error: ")


def flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    for i in range(20):
        raw[-40 + i] ^= 0x55
    path.write_bytes(bytes(raw))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=None)
    root = p.parse_args().root or Path(tempfile.mkdtemp(prefix="matrix-"))
    rows = []

    def case(name: str, proc: subprocess.CompletedProcess, expect_error: bool = True, ok: bool = True):
        clear = one_line(proc)
        good = (clear if expect_error else proc.returncode == 0) and ok
        rows.append((name, proc.returncode, clear, good))
        line = proc.stderr.strip().splitlines()[-1][:150] if proc.stderr.strip() else ""
        print(f"{'ok ' if good else 'MISMATCH'} | {name} | exit {proc.returncode} | {line}", flush=True)

    def fresh(tag: str, levels: int = 1) -> Path:
        r = root / tag
        out = run("lottery", *GOOD, "--levels", levels, "--root", r)
        assert out.returncode == 0, out.stderr
        return Path(out.stdout.strip().splitlines()[-1])

    # 1. divergence
    for name, flags in [("sgd --lr 1e6", ["--optimizer", "sgd", "--lr", "1e6"]),
                        ("sgd --lr inf", ["--optimizer", "sgd", "--lr", "inf"]),
                        ("sgd --momentum 5", ["--optimizer", "sgd", "--lr", "0.1", "--momentum", "5"])]:
        r = root / name.replace(" ", "_")
        proc = run("lottery", *F, *flags, "--epochs", "3", "--levels", "2", "--root", r)
        case(f"diverging: {name}", proc, ok=not any(r.rglob("done.json")))
    # 2. damaged finished files
    exp = fresh("damaged", levels=2)
    flip(exp / "replicate_1/level_1/mask.safetensors")
    case("bit-flipped mask, retrain", run("retrain", exp, "--variants", "rewind", "--quiet"))
    case("bit-flipped mask, report", run("report", exp, "--out", root / "rep"))
    flip(exp / "replicate_1/level_2/train/model.safetensors")
    case("bit-flipped model, next level", run("lottery", *GOOD, "--levels", "3", "--root", root / "damaged"))
    exp = fresh("truncated")
    done = exp / "replicate_1/level_1/train/done.json"
    done.write_bytes(done.read_bytes()[:30])
    case("truncated done.json, lottery", run("lottery", *GOOD, "--levels", "1", "--root", root / "truncated"))
    # 3. two identical lotteries at once
    r = root / "concurrent"
    procs = [subprocess.Popen([*CLI, "lottery", *GOOD, "--levels", "2", "--root", str(r)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [pr.communicate() for pr in procs]
    single = fresh("single", levels=2)
    conc = r / single.name
    same = all((conc / f.relative_to(single)).read_bytes() == f.read_bytes() for f in single.rglob("*.safetensors"))
    import json
    commands = len(json.loads((conc / "config.json").read_text())["commands"])
    rows.append(("two lotteries at once", max(pr.returncode for pr in procs), False,
                 same and commands == 2 and all(pr.returncode == 0 for pr in procs)))
    print(f"{'ok ' if rows[-1][3] else 'MISMATCH'} | two lotteries at once | exits {[pr.returncode for pr in procs]} | "
          f"files equal to one run: {same}; command lines kept: {commands}/2; stderr: {[o[1][-80:] for o in outs]}")
    # 4. damaged config.json
    for name, content in [("not UTF-8", b"\xff\xfe"), ("{}", b"{}"), ("[1,2]", b"[1,2]")]:
        exp = fresh(f"config_{len(rows)}", levels=0)
        (exp / "config.json").write_bytes(content)
        for cmd in (["lottery", *GOOD, "--levels", "0", "--root", exp.parent], ["retrain", exp, "--quiet"],
                    ["report", exp, "--out", root / "rep"]):
            case(f"config.json {name}: {cmd[0]}", run(*cmd))
    # 5. nonsense input, refused before anything is written
    for name, flags in [("--lr nan", ["--lr", "nan"]), ("--weight-decay nan", ["--weight-decay", "nan"]),
                        ("--batch-size 100000", ["--batch-size", "100000"]),
                        ("npid --knn 100000", ["--task", "npid", "--nce-negatives", "64", "--knn", "100000"]),
                        ("exemplar --margin 5", ["--task", "exemplar", "--margin", "5"]),
                        ("digits --data-root x", ["--data-root", "x"])]:
        r = root / f"nonsense_{len(rows)}"
        case(name, run("lottery", *GOOD, *flags, "--levels", "1", "--root", r), ok=not r.exists())
    tree = root / "oneclass"
    from PIL import Image
    for split in ("train", "test"):
        (tree / split / "only").mkdir(parents=True, exist_ok=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(tree / split / "only" / f"{i}.png")
    case("one-class ImageFolder", run("lottery", "--dataset", "imagefolder", "--data-root", tree, "--model",
                                      "convnet", "--task", "rotation", "--optimizer", "adam", "--lr", "1e-3",
                                      "--batch-size", "4", "--epochs", "1", "--root", root / "oc", "--quiet"),
         ok=not (root / "oc").exists())
    case("sparsity --threshold nan", run("sparsity", root / "single", "--threshold", "nan"))
    for name, spec in [('lr = "abc"', '[base]\npreset = "demo"\nlr = "abc"'),
                       ('levels = "three"', 'levels = "three"\n[base]\npreset = "demo"'),
                       ("levels = -1, replicates = 0", 'levels = -1\nreplicates = 0\n[base]\npreset = "demo"')]:
        path = root / f"spec_{len(rows)}.toml"
        path.write_text(spec + '\n[grid]\ntask = ["labels"]\n')
        case(f"sweep {name}", run("sweep", path))
    exp = fresh("bf16", levels=0)
    case("fp32 run extended with --precision bf16",
         run("lottery", *GOOD, "--levels", "1", "--root", root / "bf16", "--precision", "bf16"),
         ok=not (exp / "replicate_1/level_1").exists())
    # 6. smaller
    exp = fresh("tmp", levels=0)
    junk = exp / "replicate_1/level_1/train/.checkpoint.pt.x.tmp"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"half")
    case("killed writer's temporary cleaned", run("lottery", *GOOD, "--levels", "1", "--root", root / "tmp"),
         expect_error=False, ok=not junk.exists())
    (exp / "replicate_1/level_1/train/done.json").unlink()
    rep = run("report", exp, "--out", root / "rep2")
    case("report warns about an unfinished level", rep, expect_error=False, ok="unfinished" in rep.stderr)
    modes = {stat.S_IMODE(os.stat(f).st_mode) for f in exp.rglob("*") if f.is_file() and f.suffix != ".lock"}
    rows.append(("one file mode", 0, False, len(modes) == 1))
    print(f"{'ok ' if len(modes) == 1 else 'MISMATCH'} | one file mode | modes {sorted(oct(m) for m in modes)}")

    errors = [r for r in rows if r[2]]
    print(f"\n{len(rows)} cases tried; {len(errors)} ended in one clear line (exit 2); "
          f"{sum(not r[3] for r in rows)} mismatches")


if __name__ == "__main__":
    main()
