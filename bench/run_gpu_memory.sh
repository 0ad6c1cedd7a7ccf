#!/usr/bin/env bash
# The memory benchmark on a GPU, one command: bench/run_gpu_memory.sh [OUT_DIR (default bench_out)]
# Full-depth FLUX.1 (19+38 blocks) and Qwen-Image (60 blocks), random weights built on the GPU, 1024 px,
# 4 entities, rank 16, eligen targets, bf16 autocast, checkpointing, the default max_vram_gb (automatic):
# bf16 and fp8 on the whole GPU, fp8 under a hard 12 GB (FLUX.1) / 16 GB (Qwen-Image) cap of the allocator,
# where the automatic budget (the cap minus 1 GiB) chooses the blocks to swap. Writes OUT_DIR/memory.txt; its last
# line is the JSON summary. Needs a CUDA torch ($PYTHON, default python3) and COMFYUI_DIR (or a
# scripts/setup.sh checkout). About 5 minutes on an H200 (each configuration is limited to 240 s).
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-bench_out}" && mkdir -p "$out"
python="${PYTHON:-python3}"
begin=$SECONDS
"$python" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
PYTHONUNBUFFERED=1 timeout 560 "$python" "$repo/bench/bench_memory.py" --device cuda --steps 6 --timeout 240 2>&1 \
  | grep -v "^WARNING:root:torchaudio" | tee "$out/memory.txt"
echo "=== memory: exit ${PIPESTATUS[0]} after $((SECONDS - begin)) s"
