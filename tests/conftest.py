"""Test set-up: import this repo as the package ``comfyui_eligen`` and put ComfyUI on sys.path."""

import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def comfyui_dir():
    """The ComfyUI folder: $COMFYUI_DIR, else the one scripts/setup.sh recorded."""
    path = os.environ.get("COMFYUI_DIR")
    if not path:
        marker = os.path.join(REPO, ".comfyui-path")
        if os.path.exists(marker):
            path = open(marker).read().strip()
    if not path or not os.path.exists(os.path.join(path, "main.py")):
        raise RuntimeError("ComfyUI not found: run scripts/setup.sh or set COMFYUI_DIR")
    return path


def _import_comfy():
    path = comfyui_dir()
    if path not in sys.path:
        sys.path.insert(0, path)
    from comfy.cli_args import args  # must be set before comfy.model_management is imported

    args.cpu = True


def _register_package():
    if "comfyui_eligen" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        "comfyui_eligen", os.path.join(REPO, "__init__.py"), submodule_search_locations=[REPO]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_eligen"] = module
    spec.loader.exec_module(module)


_import_comfy()
_register_package()
