"""Shared set-up for scripts and benchmarks run outside a ComfyUI server: ComfyUI on sys.path and this
repo importable as the package ``comfyui_eligen`` (its name inside ComfyUI)."""

import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_comfy(device):
    """Put ComfyUI (COMFYUI_DIR, else the folder scripts/setup.sh recorded) on sys.path, select CPU or GPU,
    and register this repo as the package ``comfyui_eligen``."""
    path = os.environ.get("COMFYUI_DIR")
    marker = os.path.join(REPO, ".comfyui-path")
    if not path and os.path.exists(marker):
        path = open(marker).read().strip()
    if not path or not os.path.isfile(os.path.join(path, "main.py")):
        sys.exit("ComfyUI not found: run scripts/setup.sh or set COMFYUI_DIR")
    if path not in sys.path:
        sys.path.insert(0, path)
    from comfy.cli_args import args  # must be set before comfy.model_management is imported

    args.cpu = device == "cpu"
    if "comfyui_eligen" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "comfyui_eligen", os.path.join(REPO, "__init__.py"), submodule_search_locations=[REPO])
        module = importlib.util.module_from_spec(spec)
        sys.modules["comfyui_eligen"] = module
        spec.loader.exec_module(module)
