"""Command line of the toy world (runs outside a ComfyUI server).

    .venv/bin/python scripts/toyworld.py build-weights [--steps N ...]   pretrain the shipped base model
    .venv/bin/python scripts/toyworld.py dataset FOLDER [--count N --split heldout]
    .venv/bin/python scripts/toyworld.py metric IMAGES_DIR DATASET_DIR [--json out.json]
    .venv/bin/python scripts/toyworld.py compare [--seeds 0 1 2 ...] [--groups all]  (a)/(b)/(d) placement
                                                                          figures with bound, ceiling, intervals
    .venv/bin/python scripts/toyworld.py style [--seeds 0 ...]          (d) with a stacked style LoRA
    .venv/bin/python scripts/toyworld.py ablations [--family F ...]     recipe ablations (one setting at a time)
    .venv/bin/python scripts/toyworld.py demo [--out demo_out]            README command 1 (scripts/demo.sh)
    .venv/bin/python scripts/toyworld.py workflows                        rewrite example_workflows/toyworld_*

The repository is imported as the package ``comfyui_eligen`` (its name inside ComfyUI) with ComfyUI
from $COMFYUI_DIR or the folder scripts/setup.sh recorded. Add --gpu to run on a GPU.
"""

import importlib
import os
import sys

from comfy_env import setup_comfy

COMMANDS = {
    "build-weights": "toyworld.build_weights",
    "dataset": "toyworld.data",
    "metric": "toyworld.metric",
    "compare": "toyworld.compare",
    "style": "toyworld.style",
    "ablations": "toyworld.ablations",
    "demo": "toyworld.demo",
    "workflows": "toyworld.workflows",
}



def main():
    argv = sys.argv[1:]
    if not argv or argv[0] not in COMMANDS:
        sys.exit(__doc__)
    use_gpu = "--gpu" in argv
    argv = [a for a in argv if a != "--gpu"]
    setup_comfy("cuda" if use_gpu else "cpu")
    module = importlib.import_module("comfyui_eligen." + COMMANDS[argv[0]])
    result = module.main(argv[1:])
    return 0 if result is None or result else 1


if __name__ == "__main__":
    sys.exit(main())
