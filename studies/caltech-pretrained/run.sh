#!/bin/bash
# The caltech-pretrained study, start to finish: both specs in one sweep, the report, and the table that sets the
# pre-trained arms against the from-scratch ones. It starts from studies/cifar10-cpu's runs (level 0
# of replicates 1-3 of its labels and RotNet experiments): run that study first.
# Re-running resumes; finished steps are read back. Usage: bash studies/caltech-pretrained/run.sh
# WORKERS (default 2) sweep workers, each on one thread (as in cifar10-cpu).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../env.sh"
export OMP_NUM_THREADS=1
workers=${WORKERS:-2}
# Before anything is written: the source runs pruning.toml names are the experiments cifar10-cpu's
# specs build today (their names hash their settings: an edited spec builds another), and trained.
python - "$here" <<'PY'
import sys
from pathlib import Path
from sslprune import layout
from sslprune.sweep import load_spec

here = Path(sys.argv[1])
spec = load_spec(here / "pruning.toml")
sources = {str(s.root / e.name()) for s in (load_spec(here.parent / "cifar10-cpu" / f"{n}.toml")
                                            for n in ("labels", "rotation")) for e in s.experiments}
for exp in spec.experiments:
    src = exp.model.pretrained
    if not src:
        continue
    if src not in sources:
        sys.exit(f"pruning.toml starts from {src}, which studies/cifar10-cpu's specs do not build; "
                 f"they build: {', '.join(sorted(sources))}. Point 'pretrained' at those.")
    missing = [r for r in range(1, spec.replicates + 1)
               if not layout.is_done(layout.level_dir(Path(src), r, 0) / "train")]
    if missing:
        sys.exit(f"{src}: level 0 of replicate(s) {missing} is not trained yet; run "
                 f"'bash studies/cifar10-cpu/run.sh' first (only level 0 of each replicate is needed)")
PY
sslprune sweep "$here/pruning.toml" "$here/baselines.toml" --workers "$workers"
sslprune report "$here/runs" --out "$here/report"
python "$here/compare.py" "$here/runs" "$here/report"
