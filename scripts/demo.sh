#!/usr/bin/env bash
# The EliGen toy-world demo: set up, start ComfyUI headless, run the four toy workflows with
# `comfy run` (base, EliGen attention, train the EliGen LoRA, LoRA + attention) and write
# demo_out/report.md, contact_sheet.png and loss.png. About 5-10 minutes on 2 CPU cores.
#
#   bash scripts/demo.sh [--out demo_out] [--layouts 16] [--train-steps 200]
set -euo pipefail
cd "$(dirname "$0")/.."
echo "[demo] setting up (scripts/setup.sh)"
bash scripts/setup.sh
export DO_NOT_TRACK=1
exec "${ELIGEN_VENV:-.venv}/bin/python" scripts/toyworld.py demo "$@"
