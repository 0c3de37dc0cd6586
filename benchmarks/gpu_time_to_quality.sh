#!/usr/bin/env bash
# Time to quality on a CUDA GPU (bf16 autocast), for when a GPU machine is lent (CI never has one):
# the harness's 60-step default job, baseline against the DropBP arms below, at two seeds.
# About 4 minutes on one H100 (model loads dominate). Prints one table; results go to
# benchmarks/results/gpu/ (commit them with the card's name, which the table's first line gives).
#   bash benchmarks/gpu_time_to_quality.sh [ARMS]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
ARMS="${1:-baseline,p0.5,linear0.5}"
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU: this script is for a GPU machine")'
MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 \
  "$PY" benchmarks/bench_time_to_quality.py --device cuda --dtype bfloat16 --arms "$ARMS" --seeds 0,1 \
  --speed-rounds 10 --runs-dir "${RUNS_DIR:-/tmp/dropbp-quality-gpu}" --out benchmarks/results/gpu
