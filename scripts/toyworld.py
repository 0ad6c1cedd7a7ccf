"""Command line of the toy world (runs outside a ComfyUI server).

    .venv/bin/python scripts/toyworld.py build-weights [--steps N ...]   pretrain the shipped base model
    .venv/bin/python scripts/toyworld.py dataset FOLDER [--count N --split heldout]
    .venv/bin/python scripts/toyworld.py metric IMAGES_DIR DATASET_DIR [--json out.json]
    .venv/bin/python scripts/toyworld.py compare [--seeds 0 1 2 ...]      (a)/(b)/(d) placement figures
    .venv/bin/python scripts/toyworld.py demo [--out demo_out]            README command 1 (scripts/demo.sh)
    .venv/bin/python scripts/toyworld.py workflows                        rewrite example_workflows/toyworld_*

The repository is imported as the package ``comfyui_eligen`` (its name inside ComfyUI) with ComfyUI
from $COMFYUI_DIR or the folder scripts/setup.sh recorded. Add --gpu to run on a GPU.
"""

import importlib
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {
    "build-weights": "toyworld.build_weights",
    "dataset": "toyworld.data",
    "metric": "toyworld.metric",
    "compare": "toyworld.compare",
    "demo": "toyworld.demo",
    "workflows": "toyworld.workflows",
}


def bootstrap(use_gpu=False):
    comfy_dir = os.environ.get("COMFYUI_DIR")
    marker = os.path.join(REPO, ".comfyui-path")
    if not comfy_dir and os.path.exists(marker):
        comfy_dir = open(marker).read().strip()
    if not comfy_dir or not os.path.exists(os.path.join(comfy_dir, "main.py")):
        sys.exit("ComfyUI not found: run scripts/setup.sh or set COMFYUI_DIR")
    sys.path.insert(0, comfy_dir)
    from comfy.cli_args import args  # before comfy.model_management is imported

    args.cpu = not use_gpu
    if "comfyui_eligen" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "comfyui_eligen", os.path.join(REPO, "__init__.py"), submodule_search_locations=[REPO])
        package = importlib.util.module_from_spec(spec)
        sys.modules["comfyui_eligen"] = package
        spec.loader.exec_module(package)


def main():
    argv = sys.argv[1:]
    if not argv or argv[0] not in COMMANDS:
        sys.exit(__doc__)
    use_gpu = "--gpu" in argv
    argv = [a for a in argv if a != "--gpu"]
    bootstrap(use_gpu)
    module = importlib.import_module("comfyui_eligen." + COMMANDS[argv[0]])
    result = module.main(argv[1:])
    return 0 if result is None or result else 1


if __name__ == "__main__":
    sys.exit(main())
