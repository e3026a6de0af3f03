#!/bin/bash
# The committed results of this study, docs/results/cifar10-cpu, made again from the finished runs of
# cifar10-cpu and caltech-pretrained with this checkout's code; nothing is trained. In order: the
# report and natural sparsity of cifar10-cpu's runs, caltech-pretrained's report and its side-by-side
# table, the findings table, and what each spec cost (from its ledger).
# Usage: bash studies/cifar10-cpu/publish.sh [STUDIES]
#   STUDIES: the folder holding cifar10-cpu/ and caltech-pretrained/ with their runs/ (default: the
#   studies/ of this checkout; a git worktree's studies/ when the study ran there). OUT overrides
#   the output folder.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
studies="$(cd "${1:-$repo/studies}" && pwd)"
out="${OUT:-$repo/docs/results/cifar10-cpu}"
source "$repo/studies/env.sh"
for need in "$studies/cifar10-cpu/runs" "$studies/caltech-pretrained/runs"; do
  [ -d "$need" ] || { echo "publish.sh: $need does not exist; run the studies first (README.md here)" >&2; exit 2; }
done
mkdir -p "$out/caltech-pretrained"
sslprune report "$studies/cifar10-cpu/runs" --out "$out"
sslprune sparsity "$studies/cifar10-cpu/runs" --threshold 1.2e-7,1e-4,1e-3 --out "$out"
sslprune report "$studies/caltech-pretrained/runs" --out "$out/caltech-pretrained"
python "$repo/studies/caltech-pretrained/compare.py" "$studies/caltech-pretrained/runs" "$out/caltech-pretrained"
python "$here/findings.py" "$out" --caltech "$out/caltech-pretrained"
# the specs beside the runs: they name the runs' folder (root) relative to themselves
{ for spec in cifar10-cpu/labels cifar10-cpu/rotation cifar10-cpu/rewind cifar10-cpu/semi cifar10-cpu/labels-10pct \
              caltech-pretrained/pruning caltech-pretrained/baselines; do
    echo "$spec.toml: $(sslprune sweep "$studies/$spec.toml" --status 2>&1 | tr '\n' ' ')"
  done; } > "$out/budget.txt"
echo "$out/budget.txt"
