#!/bin/bash
# Issue 4 on real data, 3 replicates: labels and RotNet (CIFAR-10 5k, convnet, 8 epochs), levels 0-3,
# linear probes on CIFAR-10 and Caltech-101, both transfer arms on Caltech-101 (Adam 1e-3, 20 epochs).
set -e
cd "$(dirname "$0")/../../.."
export PATH="$PWD/.venv/bin:$PATH"
C=../shared/data/cifar10-images/cifar10-images.tar.gz
K=../shared/data/caltech101-subset/caltech101-subset.tar.gz
COMMON="--dataset imagefolder --data-root $C --train-per-class 500 --test-per-class 100 --model convnet --optimizer adam --lr 1e-3 --weight-decay 1e-4 --batch-size 128 --epochs 8 --schedule cosine --crop-pad 2 --flip --rewind 1ep --levels 3 --replicates 3 --root runs/cifar10 --quiet"
TRANSFER="--optimizer adam --lr 1e-3 --weight-decay 1e-4 --batch-size 128 --epochs 20 --schedule cosine --crop-pad 2 --flip"
for t in labels rotation; do
  s=$(date +%s)
  d=$(sslprune lottery $COMMON --task $t | tail -1)
  echo "$t lottery replicates 1-3, levels 0-3: $(( $(date +%s)-s ))s"; s=$(date +%s)
  sslprune eval probe $d
  sslprune eval probe $d --dataset imagefolder --data-root $K
  echo "$t probes: $(( $(date +%s)-s ))s"; s=$(date +%s)
  sslprune eval finetune $d --dataset imagefolder --data-root $K $TRANSFER --quiet
  echo "$t transfer arm 1, fine-tune: $(( $(date +%s)-s ))s"; s=$(date +%s)
  sslprune lottery --task labels --dataset imagefolder --data-root $K --image-size 32 --model convnet $TRANSFER --rewind 0it --levels 3 --replicates 3 --pretrained $d --root runs/transfer --quiet
  echo "$t transfer arm 2, prune during transfer: $(( $(date +%s)-s ))s"
done
sslprune report runs/cifar10 runs/transfer --out report/cifar10-probe-transfer
sslprune sparsity runs/cifar10 --threshold 1.2e-7,1e-4,1e-3 --out report/cifar10-probe-transfer
