#!/usr/bin/env bash
# The memory benchmark on a GPU (one command): full-depth FLUX.1 (19+38 blocks) and Qwen-Image (60 blocks)
# with random weights built on the GPU, 1024 px, 4 entities, rank 16, eligen targets, bf16 autocast,
# checkpointing: bf16 and fp8 without a limit, fp8 + block swap under a hard 12 GB (FLUX.1) / 16 GB
# (Qwen-Image) cap. Output: OUT_DIR/memory.txt (default bench_out/), the last line is the JSON summary.
# Needs a CUDA torch and COMFYUI_DIR (or a scripts/setup.sh checkout). About 5 minutes on an H200.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${1:-bench_out}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
start=$SECONDS
timeout 560 "$PY" bench/bench_memory.py --device cuda --steps 6 --timeout 240 2>&1 \
  | grep -v "^WARNING:root:torchaudio" | tee "$OUT_DIR/memory.txt"
echo "=== memory: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
