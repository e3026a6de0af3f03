#!/bin/bash
# The GPU check: every CUDA path of sslprune in a few minutes on one GPU, one table (benchmarks/gpu_check.py).
#   bash benchmarks/gpu_check.sh [--out DIR] [--cifar PATH]          # on a machine with a GPU
# Runs from the checkout with the machine's own python3 and PyTorch (nothing is installed): packages
# it lacks travel as wheels in .whl/ (e.g. torch-pruning), unpacked to a temporary site folder.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" benchmarks/gpu_check.py --device "${DEVICE:-cuda}" "$@"
