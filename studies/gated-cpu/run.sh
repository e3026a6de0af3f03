#!/bin/bash
# The gated-cpu study, start to finish: the sweep (trainings and probes), then the report.
# Re-running resumes; finished steps are read back. Usage: bash studies/gated-cpu/run.sh
# WORKERS (default 2) sweep workers, each on one thread.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../env.sh"
export OMP_NUM_THREADS=1
sslprune sweep "$here/gated.toml" --workers "${WORKERS:-2}"
sslprune report "$here/runs" --out "$here/report"
