#!/usr/bin/env bash
# Run the GPU parts of the benchmarks (real FLUX.1 / Qwen-Image block widths, random weights) and keep
# each script's output in OUT_DIR (default bench_out/). Needs a CUDA torch and COMFYUI_DIR (or a
# scripts/setup.sh checkout). Each benchmark has its own time limit so one slow part cannot starve the rest.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${1:-bench_out}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

run() {  # name, time limit (s), command...
  local name="$1" limit="$2"; shift 2
  echo "=== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.txt" | grep -v "^WARNING:root:torchaudio"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
run entities 200 "$PY" bench/bench_entities.py --device cuda --real-widths --blocks 2 --repeats 5
run training 240 "$PY" bench/bench_training.py --device cuda --real-widths
run dataset 90 "$PY" bench/bench_dataset.py --device cuda --images 4 --size 1024
