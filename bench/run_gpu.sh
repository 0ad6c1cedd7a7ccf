#!/usr/bin/env bash
# Run the GPU parts of the benchmarks (real FLUX.1 / Qwen-Image block widths, random weights) and keep
# each script's output in OUT_DIR (default bench_out/). Needs a CUDA torch and COMFYUI_DIR (or a
# scripts/setup.sh checkout). Each benchmark has its own time limit so one slow part cannot starve the rest.
#   ONLY=<name> runs one part (entities, training, dataset); DEVICE=cpu runs the entities part at tiny
#   sizes on the CPU (a check of the script itself, no GPU figures): DEVICE=cpu ONLY=entities bench/run_gpu.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${1:-bench_out}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

DEVICE="${DEVICE:-cuda}"

run() {  # name, time limit (s), command...
  local name="$1" limit="$2"; shift 2
  if [ -n "${ONLY:-}" ] && [ "$name" != "$ONLY" ]; then return; fi
  echo "=== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.txt" | grep -v "^WARNING:root:torchaudio"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
# Entity attention: sampling with 2/4/8 entities (FLUX real-length and padded to 512, Qwen-Image), every
# attention method side by side against plain sampling, a training step with vs without entities, the
# peak memory of one attention call (8 padded FLUX entities, 1024 px) and one attention call per design.
if [ "$DEVICE" = cuda ]; then
  run entities 420 "$PY" bench/bench_entities.py --device cuda --real-widths --blocks 2 --repeats 5
else
  run entities 600 "$PY" bench/bench_entities.py --device cpu --repeats 1 --steps 1 --counts 2 --train-counts 2 --memory-px 128
fi
run training 240 "$PY" bench/bench_training.py --device cuda --real-widths
run dataset 90 "$PY" bench/bench_dataset.py --device cuda --images 4 --size 1024
