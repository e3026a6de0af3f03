"""Command line: demo, lottery, the evaluations, report, ... Config flags mirror the config dataclass
fields (their help is the field's trailing comment in config.py); a --preset sets many at once, and
flags given on the command line override it. Each evaluation (`sslprune retrain`, `sslprune eval
probe`, ...) brings its own sub-command from the registry (sslprune/evaluations.py), with the flag
helpers here."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import io
import json
import math
import shlex
import sys
import time
from pathlib import Path

from . import config, distributed
from .config import DEMO_TASKS, PRESETS, REQUIRED, RUN_DEFAULTS, Experiment, field_names, read_config
from .config import resolve as config_resolve
from .errors import UserError
from .runtime import PRECISIONS, Runtime


EVALUATIONS_GUIDE = """\
what a pruned network is worth (Caron et al. 2020), and the command for each:
  re-train the mask on labels    sslprune retrain RUN --variants rewind,reinit
  random pruning baselines       sslprune retrain RUN --variants random,random_adjusted
                                 (random_adjusted prunes the dense network's naturally-zero weights first)
  linear probe, frozen features  sslprune eval probe RUN [--dataset D --data-root P] [--stage M]
  transfer, arm 1: fine-tune     sslprune eval finetune RUN --dataset D --data-root P [training flags]
                                 (each level's pruned network, mask fixed, fresh head for D's classes)
  transfer, arm 2: prune during  sslprune lottery --task labels --dataset D --data-root P --pretrained RUN
    transfer                       --rewind 0it --levels N [training flags]
                                 (replicate r prunes RUN's replicate r's dense level 0 on D)
  natural sparsity               sslprune sparsity RUN [--threshold T ...]
  stability to SGD noise         sslprune eval stability RUN [--level L]    (linear-mode connectivity of two
                                 copies from the rewind point; lotteries with other --rewind for the sweep)
  layerwise pruning              sslprune lottery ... --layers N   (only the first N convs; then any of the above)
  each layer alike               sslprune lottery ... --scope layer   (not global: every layer at one density;
                                 the report's layer_density.csv shows where any mask keeps its weights)
  pre-trained, then pruned       sslprune lottery ... --pretrained FILE   (ours, torchvision, MoCo, DINO, SwAV,
                                 SimCLR, solo-learn, lightly, VISSL; --pretrained-prefix overrides the detection)
  channel pruning                sslprune lottery ... --granularity channel [--channel-score l1|l2|bn] [--channel-round 8]
  params, MACs, latency          sslprune eval cost RUN   (each mask's network against dense, measured)
  a standalone network           sslprune export RUN --level L [--retrain rewind] --format safetensors,onnx
  everything, mean +- s.e.       sslprune report RUN... --out DIR   (arms 1 and 2 share one table per D)
  a study, many runs at once     sslprune sweep SPEC... --workers N   (several specs, one pool; --status)
"""


def _field_help() -> dict[str, str]:
    """Each option's help, declared beside its field in config.py (one place documents it)."""
    return {k: v for _, cls in _sections() for k, v in config.field_help(cls).items()}


def _sections():
    return [(f.name, f.default_factory) for f in dataclasses.fields(Experiment)]


def _field_flag(g, f: dataclasses.Field, help_text: str) -> None:
    """One config field as a flag, defaulting to None (= not given: the preset's, the run's, the default)."""
    flag = "--" + f.name.replace("_", "-")
    if isinstance(f.default, bool):
        g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    elif isinstance(f.default, tuple):
        g.add_argument(flag, type=_int_tuple, default=None, metavar="A,B,...", help=help_text)
    else:
        g.add_argument(flag, type=type(f.default), default=None, help=help_text)


def add_config_flags(p: argparse.ArgumentParser) -> None:
    helps = _field_help()
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a preset (flags override it)")
    for section, cls in _sections():
        g = p.add_argument_group(f"{section} options")
        for f in dataclasses.fields(cls):
            unset = f.name in REQUIRED  # no default: a preset or this flag must give it
            _field_flag(g, f, f"{helps.get(f.name, '')} [{'no default: set it or pick a --preset' if unset else f'default: {f.default!r}'}]")


def run_args(p: argparse.ArgumentParser, levels: str = "every trained level") -> None:
    """The run, and the levels and replicates of it to work on."""
    p.add_argument("run_dir", type=Path, help="experiment directory printed by 'sslprune lottery'")
    _level_arg(p, levels)
    p.add_argument("--replicates", type=_replicates, default=None, help="N means 1..N; '3-4' exactly those [default: all]")


def evaluation_args(p: argparse.ArgumentParser, required: bool) -> None:
    """The run, the levels and replicates to evaluate, and the data to evaluate on."""
    run_args(p)
    p.add_argument("--dataset", required=required, default=None, help="digits | cifar10 | imagefolder"
                   + ("" if required else " [default: the run's own dataset]"))
    p.add_argument("--data-root", default=None, help="its location, e.g. "
                   "../shared/data/caltech101-subset/caltech101-subset.tar.gz [default: the run's]")
    p.add_argument("--image-size", type=int, default=None, help="resize images to this side [default: the run's]")
    p.add_argument("--train-per-class", type=int, default=0, help="keep the first N training images of each class (0 = all)")
    p.add_argument("--test-per-class", type=int, default=0, help="keep the first N test images of each class (0 = all)")


def train_flags(p: argparse.ArgumentParser) -> None:
    """The Train section's flags and the dataset-augmentation flags, all defaulting to None (= keep)."""
    helps = _field_help()
    g = p.add_argument_group("training options (default: the run's)")
    for f in [*dataclasses.fields(config.Train), *[f for f in dataclasses.fields(config.Data) if f.name in ("crop_pad", "flip")]]:
        _field_flag(g, f, helps.get(f.name, ""))


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def resolve(args: argparse.Namespace) -> tuple[Experiment, dict]:
    """defaults < preset < --config file < flags (config.resolve, as a sweep's spec). Returns the
    experiment and how much of it to run (levels, replicates as a list)."""
    config = getattr(args, "config", None)
    values = read_config(config) if config else {}
    if args.preset:
        values["preset"] = args.preset
    for name in sorted(field_names() | set(RUN_DEFAULTS)):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    if getattr(args, "pretrained", None):  # a flag's path is the working directory's
        values["pretrained"] = str(Path(args.pretrained).resolve())
    exp, run = config_resolve(values, str(config or "flags"), config.parent if config else None)
    if isinstance(run["replicates"], int):  # a count: replicates 1..N
        run["replicates"] = list(range(1, run["replicates"] + 1))
    return exp, run


def print_config(exp: Experiment, run: dict) -> str:
    """The resolved configuration as a --config file (every field; lists of numbers as TOML arrays)."""
    flat = {k: v for section in exp.to_dict().values() for k, v in section.items()}
    flat |= {"levels": run["levels"], "replicates": run["replicates"]}
    return "".join(f"{k} = {json.dumps(list(v) if isinstance(v, tuple) else v)}\n" for k, v in flat.items())


def _numbers(text: str) -> list[int]:
    """'3' -> [3]; '0-5' -> [0..5]; '1,3,5' -> [1, 3, 5]."""
    try:
        out = []
        for part in text.split(","):
            a, _, b = part.partition("-")
            if b and int(b) < int(a):
                raise ValueError(part)   # '3-1' would silently mean nothing
            out += list(range(int(a), int(b) + 1)) if b else [int(a)]
        return out
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like '3', '0-5' (ascending) or '1,3', got '{text}'") from None


def words(*choices: str):
    """A comma-separated list of choices: 'rewind,reinit' -> ['rewind', 'reinit'] (one list syntax everywhere)."""
    def parse(text: str) -> list[str]:
        given = [w for w in text.split(",") if w]
        bad = [w for w in given if w not in choices]
        if bad or not given:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(choices)}; got '{text}'")
        return given
    return parse


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like '1e-4,1e-3', got '{text}'") from None


def _level_arg(p: argparse.ArgumentParser, default_text: str, default=None) -> None:
    """--level picks existing levels ('3', '0-5', '1,3'); --levels N, which creates levels 0..N, is
    lottery's. A --levels here is caught with the fix (cmd's check of args.levels_misused)."""
    p.add_argument("--level", type=_numbers, default=default, metavar="L",
                   help=f"levels: '3', '0-5' or '1,3' [default: {default_text}]")
    p.add_argument("--levels", dest="levels_misused", default=None, help=argparse.SUPPRESS)


def _replicates(text: str) -> list[int]:
    """'6' -> replicates 1..6 (a count); '3-4' or '2,5' -> exactly those (to split a study across machines)."""
    if text.isdigit():
        return list(range(1, int(text) + 1))
    return _numbers(text)


def common_flags(p: argparse.ArgumentParser, trains: bool = True) -> None:
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 [default: cpu]")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if not trains:  # the runtime flags shape training steps only
        return
    g = p.add_argument_group("runtime (not part of the experiment; a run resumes only under the same)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format for convs [default: on; see sslprune/runtime.py]")
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 autocast on a CUDA GPU with bf16, fp32 on a CPU (bf16 there: faster "
                   "with AVX512-BF16 units, ~50x slower without) [default: auto]")
    g.add_argument("--compile", action="store_true", help="torch.compile the backbone (compile time "
                   "counts against the run; pays off on long runs)")
    g.add_argument("--track", default="", choices=["", "tensorboard", "wandb", "mlflow"], metavar="BACKEND",
                   help="also send each run's per-epoch metrics to tensorboard (event files in the run's "
                   "folder), wandb or mlflow; pip install 'sslprune[<backend>]' [default: off]")
    g.add_argument("--loader-workers", type=int, default=None, help="--stream: processes decoding images "
                   "(0 = in the training process) [default: the CPUs per training process - 1, at most 8]")


def stack_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stack", type=int, default=0, metavar="K",
                   help="train up to K re-trainings as one network (torch.func.vmap over their stacked "
                   "weights; sslprune/stacked.py): meant for small networks on a GPU (not measured there yet); "
                   "0.7x as fast on a CPU (docs/benchmarks.md); results match one at a time to rounding "
                   "[default: one at a time]")


def runtime_of(args) -> Runtime:
    """The runtime flags, checked (an unusable device or precision is a one-line error)."""
    check_device(args.device)
    rt = Runtime(args.device, args.channels_last, args.precision, args.compile, args.loader_workers, args.track,
                 getattr(args, "stack", 0))
    rt.resolved()
    return rt


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sslprune", description="Prune convnets trained with or without "
                                "labels (Caron et al. 2020) and measure what the pruned networks are worth.")
    from . import __version__
    from .evaluations import EVALUATIONS
    p.add_argument("--version", action="version", version=f"sslprune {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="the whole method in miniature (digits, no download, <10 min)",
                       description="Lottery-ticket pruning driven by labels, RotNet and NPID on scikit-learn's "
                       "digits, masks re-trained on labels (winning ticket, re-init, random pruning), "
                       "and one report.")
    d.add_argument("--tasks", type=lambda t: tuple(x for x in t.split(",") if x), default=DEMO_TASKS,
                   metavar="A,B,...", help="objectives to prune with, e.g. labels,rotation,exemplar,npid,s4l "
                   f"[default: {','.join(DEMO_TASKS)}]")
    d.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder [default: demo_out]")
    d.add_argument("--replicates", type=int, default=PRESETS["demo"]["replicates"], help="replicates (seeds) [default: %(default)s]")
    d.add_argument("--levels", type=int, default=PRESETS["demo"]["levels"],
                   help="pruning levels after the dense one [default: %(default)s]")
    d.add_argument("--workers", type=int, default=0, help="independent steps run side by side, one thread each "
                   "(0 = one per core; the results do not depend on it) [default: 0]")
    common_flags(d)

    lo = sub.add_parser("lottery", help="iterative magnitude pruning: train, prune, reset, repeat",
                        description="Runs levels 0..LEVELS for replicates 1..REPLICATES under ROOT/<name>, "
                        "resuming whatever exists. Prints the experiment directory.")
    add_config_flags(lo)
    lo.add_argument("--root", type=Path, default=Path("runs"), help="where experiments live [default: runs]")
    lo.add_argument("--data-root", default=None, help="dataset location (cifar10: folder holding "
                    "cifar-10-batches-py, downloaded there when absent; imagefolder: folder or .tar.gz)")
    lo.add_argument("--levels", type=int, default=None, help=f"prune this many levels after the dense "
                    f"one [default: preset's, else {RUN_DEFAULTS['levels']}]")
    lo.add_argument("--replicates", type=_replicates, default=None, help=f"N runs replicates 1..N; "
                    f"'3-4' or '2,5' runs exactly those [default: preset's, else {RUN_DEFAULTS['replicates']}]")
    lo.add_argument("--config", type=Path, default=None, help="a TOML file of settings (flag names without "
                    "dashes, as a sweep's [base]; 'preset', 'levels', 'replicates'); flags override it")
    lo.add_argument("--print-config", action="store_true", help="print the resolved configuration (a --config "
                    "file) and the experiment's name, then stop: nothing runs")
    common_flags(lo)

    ev = sub.add_parser("eval", help="evaluate every level of a lottery run (linear probe, transfer)",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Evaluations of the networks a lottery run trained. Each writes its result "
                        "next to the level it\nevaluates (level_<L>/<evaluation>_<data>_<hash>/), is idempotent, "
                        "and flows into 'sslprune report'.",
                        epilog=EVALUATIONS_GUIDE)
    ev_sub = ev.add_subparsers(dest="evaluation", required=True, metavar="EVALUATION")
    for e in EVALUATIONS.values():   # `sslprune retrain`, `sslprune eval probe`, ...: each one's own flags
        ep = (sub if e.top_level else ev_sub).add_parser(e.name, help=e.help, description=e.description)
        e.add_arguments(ep)
        ep.set_defaults(evaluation=e.name)

    ex = sub.add_parser("export", help="a level as a standalone network file (compact for channel pruning)",
                        description="Writes one level's network as model.safetensors (torchvision-style keys), "
                        "export.json (architecture, input normalisation, provenance, params and MACs) and, "
                        "with --format onnx, model.onnx. Channel granularity: dead channels are removed, a "
                        "smaller dense network; weight granularity: the dense network with its pruned weights "
                        "at zero (no speed-up). Load it with sslprune.export.load_exported(DIR).")
    ex.add_argument("run_dir", type=Path, help="experiment directory printed by 'sslprune lottery'")
    ex.add_argument("--level", type=int, required=True, help="the level to export")
    ex.add_argument("--levels", dest="levels_misused", default=None, help=argparse.SUPPRESS)
    ex.add_argument("--replicate", type=int, default=1, help="the replicate [default: 1]")
    ex.add_argument("--retrain", default=None, choices=["rewind", "reinit", "random", "random_adjusted"],
                    help="export the level re-trained on labels from this start, with its label head (a "
                    "classifier) [default: the lottery's network, backbone only (features)]")
    ex.add_argument("--format", type=words("safetensors", "onnx"), default=["safetensors"], metavar="A,B",
                    help="files to write, comma-separated: safetensors, onnx [default: safetensors]")
    ex.add_argument("--path", default="dense", choices=["dense", "gated"],
                    help="a run trained with --budget: the dense path (an ordinary ResNet) or the gated path "
                    "(channels never opened on the training split removed) [default: dense]")
    ex.add_argument("--out", type=Path, default=None, help="output folder [default: export_<run>_r<R>_l<L>]")

    sp = sub.add_parser("sparsity", help="natural sparsity of trained networks, per layer and in total",
                        description="Fraction of each trained network's prunable weights with |w| <= "
                        "threshold (Caron et al. 2020, Fig. 6 and 10). Writes natural_sparsity.csv, .md "
                        "and .png. The adjusted random baseline that prunes these weights first is "
                        "'sslprune retrain RUN --variants random_adjusted'.")
    sp.add_argument("run_dirs", type=Path, nargs="+", help="experiment directories (or a root holding them)")
    sp.add_argument("--threshold", type=_floats, default=[None], metavar="T,T",
                    help="thresholds on |w|, comma-separated [default: machine epsilon of the dtype]")
    _level_arg(sp, "0, the dense network", default=[0])
    sp.add_argument("--with-init", action="store_true", help="also each replicate's initial weights: "
                    "the mass near zero training started from (compare before reading a loose threshold)")
    sp.add_argument("--out", type=Path, default=Path("report"), help="output folder [default: report]")

    sw = sub.add_parser("sweep", help="a declared grid of runs and evaluations, by N workers or SLURM jobs",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Runs every step of a sweep spec (TOML; format below) with independent "
                        "workers sharing one run root.\nA step is taken under a file lock, so none is computed "
                        "twice, and a dead worker's step is\npicked up by another worker or the next run "
                        "(resuming from its checkpoint).",
                        epilog=_sweep_doc())
    sw.add_argument("spec", type=Path, nargs="+", help="sweep spec(s) (TOML); several share the workers, so "
                    "none idles while one spec's last steps wait on each other")
    sw.add_argument("--workers", type=int, default=1, help="worker processes, or jobs with --submit [default: 1]")
    sw.add_argument("--status", action="store_true", help="print what is done and pending, and the epochs "
                    "trained against those without reuse; run nothing")
    sw.add_argument("--submit", choices=["local", "slurm"], default=None,
                    help="submit the workers as jobs through submitit (local: processes here, waited for; "
                    "slurm: sbatch, returns at once)")
    sw.add_argument("--slurm-partition", default=None)
    sw.add_argument("--slurm-time", type=int, default=60, help="minutes per job [default: 60]")
    sw.add_argument("--slurm-gpus-per-node", type=int, default=None)
    sw.add_argument("--slurm-cpus-per-task", type=int, default=None)
    stack_flag(sw)

    rep = sub.add_parser("report", help="results.csv, summary.md and plots from experiment directories")
    rep.add_argument("run_dirs", type=Path, nargs="+", help="experiment directories (or a root holding them)")
    rep.add_argument("--out", type=Path, default=Path("report"), help="output folder [default: report]")
    return p


class _Parser(argparse.ArgumentParser):
    """Its errors are one line (argparse prints the whole usage block first); its subcommands' too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _no_abbreviations(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags are taken whole: '--level 3' on lottery must not silently mean '--levels 3'."""
    p.allow_abbrev = False
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _no_abbreviations(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _no_abbreviations(parser()).parse_args(argv)
    try:
        if distributed.launched():  # torchrun --nproc_per_node N -m sslprune ...
            if args.command not in DISTRIBUTED_COMMANDS or not hasattr(args, "device"):  # eval cost times, not trains
                raise UserError(f"'{args.command}{' ' + args.evaluation if getattr(args, 'evaluation', None) else ''}' "
                                f"runs on one process; launch it without torchrun "
                                f"(under torchrun: {', '.join(DISTRIBUTED_COMMANDS)})")
            args.device = distributed.init(args.device)
        if getattr(args, "levels_misused", None) is not None:
            raise UserError(f"--levels N creates levels 0..N in 'lottery'; '{args.command}' picks existing levels "
                            f"with --level, e.g. --level {args.levels_misused}")
        with contextlib.redirect_stdout(sys.stdout if distributed.is_main() else io.StringIO()):
            if getattr(args, "evaluation", None):
                from .evaluations import EVALUATIONS
                return EVALUATIONS[args.evaluation].command(args, argv)
            return COMMANDS[args.command](args, argv)
    except UserError as e:
        print(f"sslprune: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # what the system refuses: a path given (a file where a folder goes, ...), a full disk
        where = f": {e.filename}" if e.filename else ""
        fix = {errno.ENOSPC: "free disk space and run the same command again (it resumes)",
               errno.EDQUOT: "free disk space and run the same command again (it resumes)"}.get(
            e.errno, "check this path (a file where a folder belongs or the reverse, permissions, length)")
        print(f"sslprune: error: {e.strerror or e}{where}; {fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sslprune: interrupted; finished steps and the last finished epoch are kept: run the same command "
              "again to resume", file=sys.stderr)
        return 130
    finally:
        distributed.close()


def cmd_lottery(args, argv) -> int:
    from .lottery import lottery_run

    exp, run = resolve(args)
    if args.print_config:
        exp.validate()
        print(print_config(exp, run) + f"# experiment: {exp.name()}")
        return 0
    _check_counts(run["levels"], run["replicates"])
    exp_dir = lottery_run(exp, args.root, args.data_root, run["levels"], run["replicates"], runtime_of(args),
                          not args.quiet, list(argv))
    print(exp_dir)
    return 0


def _experiment_dirs(paths: list[Path]) -> list[Path]:
    """Experiment directories given directly or as a root holding them."""
    from . import layout

    dirs = []
    for d in paths:
        if (d / layout.CONFIG).exists():
            dirs.append(d)
        else:
            found = sorted(p.parent for p in d.glob(f"*/{layout.CONFIG}"))
            if not found:
                raise UserError(f"{d} holds no experiment (no {layout.CONFIG} in it or its subfolders)")
            dirs += found
    return dirs


def cmd_report(args, argv) -> int:
    from .report import experiments, mixed_retraining, unfinished, write_report

    dirs = experiments(_experiment_dirs(args.run_dirs))
    for line in unfinished(dirs) + mixed_retraining(dirs):
        print(f"sslprune report: warning: {line}", file=sys.stderr)
    paths = write_report(dirs, args.out)
    print("\n".join(str(p) for p in paths.values()))
    return 0


def cmd_export(args, argv) -> int:
    from .export import export

    out = args.out or Path(f"export_{Path(args.run_dir).name}_r{args.replicate}_l{args.level}")
    info = export(args.run_dir, args.replicate, args.level, out, tuple(args.format), args.retrain, args.path)
    c, d = info["cost"], info["dense_cost"]
    print(f"{out}: {info['granularity']} granularity, {info['remaining']:.2%} of the weights; params "
          f"{c['params']:,} ({c['params'] / d['params']:.1%} of dense), MACs {c['macs']:,} "
          f"({c['macs'] / d['macs']:.1%}); {info['note']}")
    return 0


def cmd_sparsity(args, argv) -> int:
    from .sparsity import write_report

    if any(t is not None and not (math.isfinite(t) and t >= 0) for t in args.threshold):
        raise UserError(f"--threshold must be >= 0 and finite, got {args.threshold}")
    paths = write_report(_experiment_dirs(args.run_dirs), args.out, tuple(args.threshold), tuple(args.level),
                         args.with_init)
    print("\n".join(str(p) for p in paths.values()))
    return 0


def cmd_demo(args, argv) -> int:
    from .demo import run_demo

    _check_counts(args.levels, list(range(1, args.replicates + 1)))
    paths = run_demo(args.out, args.replicates, args.levels, runtime_of(args), not args.quiet, list(argv), args.tasks,
                     args.workers)
    print("\n".join(str(p) for p in paths.values()))
    return 0


def _sweep_doc() -> str:
    from .sweep import SPEC_FORMAT
    return "spec format:\n" + SPEC_FORMAT


def cmd_sweep(args, argv) -> int:
    from . import workers
    from .sweep import load_spec

    typed = {}
    for p in args.spec:
        typed.setdefault(p.resolve(), p)                  # each spec once, in the order first typed
    specs = [load_spec(p) for p in typed.values()]         # all checked before anything runs
    names = [p.name for p in typed.values()]
    names = [str(p) if names.count(p.name) > 1 else p.name for p in typed.values()]   # unique labels
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if len({s.device for s in specs}) > 1:
        raise UserError("specs run together train on one device; these name "
                        + ", ".join(f"{n}: {s.device}" for s, n in zip(specs, names)) + ": run them apart")
    runtime = Runtime(specs[0].device, stack=args.stack)
    runtime.resolved()
    paths = [s.path for s in specs]
    if not args.status:
        if args.submit:
            jobs = workers.submit(paths, args.workers, args.submit, specs[0].root / ".submitit",
                                  {"partition": args.slurm_partition, "time": args.slurm_time,
                                   "gpus_per_node": args.slurm_gpus_per_node, "cpus_per_task": args.slurm_cpus_per_task},
                                  runtime)
            print(f"submitted {len(jobs)} job(s): {', '.join(str(j.job_id) for j in jobs)}")
            if args.submit == "slurm":
                print(f"follow with: {shlex.join(['sslprune', 'sweep', *map(str, typed.values()), '--status'])}")
                return 0
            for j in jobs:
                j.result()
        else:
            # on a CPU, one torch thread a worker (as the demo): N workers of all the cores would fight
            threads = 1 if runtime.device.split(":")[0] == "cpu" and args.workers > 1 else 0
            codes = workers.run_local(paths, args.workers, threads=threads, runtime=runtime)
            if any(codes):
                print(f"worker exit codes {codes}", file=sys.stderr)
    pending = False
    for spec, name in zip(specs, names):
        pending |= _print_status(workers.status(spec), f"{name}: " if len(specs) > 1 else "")
    return 1 if pending and not args.status else 0


def _print_status(st: dict, name: str) -> bool:
    """One spec's lines of `sweep` (what is done, running now and pending); True if any step is pending."""
    print(f"{name}{st['done']}/{st['steps']} steps done; epochs trained {st['epochs_trained']}, "
          f"{st['epochs_without_reuse']} without reuse of level-0 training and masks; finished steps took "
          f"{st['worker_seconds'] / 3600:.2f} worker-hours" + ("" if st["worker_cpu_seconds"] is None else
                                                               f", {st['worker_cpu_seconds'] / 3600:.2f} h of the workers' CPU time"))
    for r in st["running"]:  # a worker holds its lock now (on any machine sharing the root)
        since = "" if r["since"] is None else f" for {(time.time() - r['since']) / 60:.0f} min"
        print(f"{name}running{since}: {r['step']}" + (f" (at {r['at']})" if r["at"] else ""))
    if st["finished_twice"]:
        print(f"{name}steps finished more than once: {st['finished_twice']}", file=sys.stderr)
    if st["pending"]:
        print(f"{name}{len(st['pending'])} steps pending, e.g. {st['pending'][0]}; run the same command again "
              f"to finish them", file=sys.stderr)
    return bool(st["pending"])


def _check_counts(levels: int, replicates: list[int]) -> None:
    if levels < 0 or not replicates or min(replicates) < 1:
        raise UserError(f"--levels must be >= 0 and replicates >= 1 (got {levels}, {replicates})")


def check_device(device: str) -> None:
    import torch
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown --device '{device}'; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but torch sees no CUDA GPU; use --device cpu")


DISTRIBUTED_COMMANDS = ("lottery", "retrain", "eval")  # the ones that train: one run on N processes
COMMANDS = {"demo": cmd_demo, "lottery": cmd_lottery, "report": cmd_report, "sparsity": cmd_sparsity,
            "sweep": cmd_sweep, "export": cmd_export}   # and the evaluations' (their registry entries')
