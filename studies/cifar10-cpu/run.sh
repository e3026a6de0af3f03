#!/bin/bash
# The cifar10-cpu study, start to finish: its five specs in one sweep, then the report and natural sparsity.
# Re-running resumes; finished steps are read back. Usage: bash studies/cifar10-cpu/run.sh
# WORKERS (default 2) sweep workers, each on one thread: small networks gain nothing from a second
# core, so two trainings side by side use the machine better than one on two threads.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../env.sh"
export OMP_NUM_THREADS=1
# one pool of workers for the five specs: none idles while one spec's last steps wait on each other;
# the longest lottery chains first (S4L's, then RotNet's: they decide when the study can end)
sslprune sweep "$here"/{semi,rotation,rewind,labels-10pct,labels}.toml --workers "${WORKERS:-2}"
sslprune report "$here/runs" --out "$here/report"
sslprune sparsity "$here/runs" --threshold 1.2e-7,1e-4,1e-3 --out "$here/report"
# the findings table (report/findings.md); Hubens et al.'s row once caltech-pretrained has its report
caltech="$here/../caltech-pretrained/report"
python "$here/findings.py" "$here/report" $( [ -f "$caltech/results.csv" ] && echo --caltech "$caltech" )
