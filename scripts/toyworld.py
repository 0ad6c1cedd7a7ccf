"""Command line of the toy world and its lab (runs outside a ComfyUI server).

    .venv/bin/python scripts/toyworld.py build-weights [--steps N ...]   pretrain the shipped base model
    .venv/bin/python scripts/toyworld.py dataset FOLDER [--count N --split heldout --group G]
    .venv/bin/python scripts/toyworld.py metric IMAGES_DIR DATASET_DIR [--json out.json]
    .venv/bin/python scripts/toyworld.py compare [--seeds 0 1 2 ...] [--groups all]  (a)/(b)/(d) placement
                                                                          figures with bound, ceiling, intervals
    .venv/bin/python scripts/toyworld.py style [--seeds 0 ...]          (d) with a stacked style LoRA
    .venv/bin/python scripts/toyworld.py ablations [--family F ...]     recipe ablations (one setting at a time)
    .venv/bin/python scripts/toyworld.py demo [--out demo_out]            README command 1 (scripts/demo.sh)
    .venv/bin/python scripts/toyworld.py workflows                        rewrite the toy templates (example_workflows/)
    .venv/bin/python scripts/toyworld.py thumbnails [--json times.json]   template thumbnails from real runs, timed

The repository is imported as the package ``comfyui_eligen`` (its name inside ComfyUI) with ComfyUI
from $COMFYUI_DIR or the folder scripts/setup.sh recorded. Add --gpu to run on a GPU. Every command but
``metric`` runs from the lab (lab/), which a git clone has and the Registry package does not.
"""

import importlib
import os
import sys

from comfy_env import REPO, setup_comfy

COMMANDS = {
    "build-weights": "lab.build_weights",
    "dataset": "lab.groups",
    "metric": "toyworld.metric",
    "compare": "lab.compare",
    "style": "lab.style",
    "ablations": "lab.ablations",
    "demo": "lab.demo",
    "workflows": "lab.workflows",
    "thumbnails": "lab.thumbnails",
}


def main():
    argv = sys.argv[1:]
    if not argv or argv[0] not in COMMANDS:
        sys.exit(__doc__)
    module_name = COMMANDS[argv[0]]
    if module_name.startswith("lab.") and not os.path.isdir(os.path.join(REPO, "lab")):
        sys.exit(f"`{argv[0]}` runs from the lab folder (lab/), which the Registry package leaves out: "
                 "use a git clone of ComfyUI-EliGen")
    use_gpu = "--gpu" in argv
    argv = [a for a in argv if a != "--gpu"]
    setup_comfy("cuda" if use_gpu else "cpu")
    module = importlib.import_module("comfyui_eligen." + module_name)
    result = module.main(argv[1:])
    return 0 if result is None or result else 1


if __name__ == "__main__":
    sys.exit(main())
