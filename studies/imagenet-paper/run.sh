#!/bin/bash
# The imagenet-paper study on one machine with several GPUs: every training under torchrun on all of
# them, one after the other, then the report. commands.py prints the same commands for a cluster's
# scheduler (README.md). Re-running resumes; finished steps are read back, interrupted ones resume
# from their last epoch.
#   IMAGENET=/data/imagenet bash studies/imagenet-paper/run.sh
# GPUS (default: every GPU nvidia-smi lists) processes per training; SPECS (default: labels rotation
# exemplar npid s4l labels-10pct) picks the specs, run in that order.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../env.sh"
: "${IMAGENET:?set IMAGENET to your ImageNet folder: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG}"
for split in train val; do
  if [ ! -d "$IMAGENET/$split" ]; then
    echo "$IMAGENET/$split is missing: the specs read train/<class>/ and val/<class>/ (validation images sorted into class folders)" >&2
    exit 2
  fi
done
ln -sfn "$(cd "$IMAGENET" && pwd)" "$here/imagenet"   # the specs' data_root
gpus=${GPUS:-$(nvidia-smi -L | wc -l)}
specs=()
for s in ${SPECS:-labels rotation exemplar npid s4l labels-10pct}; do specs+=("$here/$s.toml"); done
mkdir -p "$here/logs"
python "$here/commands.py" --launcher "torchrun --standalone --nproc_per_node $gpus -m" "${specs[@]}" > "$here/logs/commands.txt"
mapfile -t lines < "$here/logs/commands.txt"
for line in "${lines[@]}"; do
  echo "$line" | cut -c1-160
  s=$(date +%s)
  bash -c "$line" < /dev/null
  echo "  $(( $(date +%s) - s )) s"
done
sslprune report "$here/runs" --out "$here/report"
