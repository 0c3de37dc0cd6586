#!/usr/bin/env bash
# GPU smoke check, for when a CUDA machine is lent (CI never has one): the main job on the GPU
# with bf16 autocast, a short compare, and the checks that need CUDA. About 5 minutes on one GPU.
#   bash benchmarks/gpu_smoke.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-/tmp/dropbp-gpu-smoke}}"
mkdir -p "$OUT"
PY="${PY:-.venv/bin/python}"
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA GPU: this script is for a GPU machine"
print("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__)
PY
# The main job on the GPU (bf16 autocast by default there); memory figures from max_memory_allocated.
"$PY" -m dropbp.app.cli finetune --device cuda --max-steps 40 --eval-every 10 --output-dir "$OUT/finetune" --overwrite
"$PY" - "$OUT/finetune" <<'PY'
import json, sys
records = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
assert all("peak_memory_bytes" in r for r in records), "CUDA runs record peak memory"
print("peak memory (MiB):", max(r["peak_memory_bytes"] for r in records) / 2**20)
PY
# Baseline vs DropBP side by side at the defaults (shorter than the README's run).
"$PY" -m dropbp.app.cli compare --device cuda --max-steps 60 --output-dir "$OUT/compare" --overwrite
# The architecture checks (tiny models on CPU, seconds): the install is sound.
"$PY" -m dropbp.app.cli check llama
"$PY" -m dropbp.app.cli check bloom
echo "gpu smoke: done; results in $OUT"
