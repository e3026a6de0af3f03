#!/bin/bash
# The cifar10-paper study on GPUs: six specs sharing runs/, then the report and natural sparsity.
# Re-running resumes; finished steps are read back, interrupted ones resume from their last epoch.
#   bash studies/cifar10-paper/run.sh                   this machine: one worker per GPU over every sweep
#   SUBMIT=slurm PARTITION=gpu bash studies/cifar10-paper/run.sh    SLURM jobs (submitit), returns at once
#   REPORT=1 bash studies/cifar10-paper/run.sh          the report only, once every step is done
# SPECS (default: semi rotation npid exemplar labels rewind: the longest lottery chains first, and rewind
# after labels and rotation, whose 1-epoch chains it shares to level 12 of their 30) picks the specs.
# SLURM: one submission per spec, MINUTES per job (default 2880), CPUS per job (default 4); the jobs
# per spec are below (README.md, "Cost").
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../env.sh"
specs=${SPECS:-semi rotation npid exemplar labels rewind}
declare -A jobs=([labels]=60 [rotation]=18 [exemplar]=24 [semi]=10 [npid]=10 [rewind]=21)

report() {
  sslprune report "$here/runs" --out "$here/report"
  sslprune sparsity "$here/runs" --threshold 1.2e-7,1e-4,1e-3 --out "$here/report"
}
if [ -n "${REPORT:-}" ]; then report; exit; fi

if [ "${SUBMIT:-}" = slurm ]; then
  for spec in $specs; do
    sslprune sweep "$here/$spec.toml" --submit slurm --workers "${jobs[$spec]}" \
      --slurm-partition "${PARTITION:?set PARTITION to a SLURM partition with GPUs}" --slurm-gpus-per-node 1 \
      --slurm-cpus-per-task "${CPUS:-4}" --slurm-time "${MINUTES:-2880}"
  done
  echo "progress: sslprune sweep $here/*.toml --status"
  echo "jobs that ran out of time leave steps pending: run this command again; when none is: REPORT=1 bash $0"
  exit
fi

# This machine: one worker per GPU (a sweep's local workers take the visible GPUs in turn), taking the
# steps of every spec; a worker with no step ready in one spec takes another's.
gpus=${CUDA_VISIBLE_DEVICES:-$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd,)}
paths=()
for spec in $specs; do paths+=("$here/$spec.toml"); done
mkdir -p "$here/logs"
if ! sslprune sweep "${paths[@]}" --workers "$(echo "$gpus" | tr ',' '\n' | grep -c .)" > "$here/logs/sweep.log" 2>&1; then
  echo "steps are pending or a worker failed (logs/sweep.log beside this file); run this command again" >&2
  exit 1
fi
report
