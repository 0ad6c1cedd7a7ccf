"""Headless EliGen LoRA training from a run file, without a ComfyUI server.

    python scripts/train.py RUN.json [--run-dir DIR] [--resume latest] [--batch-size N] [--device cpu|cuda] [--fsdp]
    torchrun --nproc_per_node 2 scripts/train.py RUN.json --batch-size 1 --device cpu

RUN.json is what the EliGen Train node writes beside its checkpoints (output/eligen_training/<name>/run.json).
ComfyUI is found through $COMFYUI_DIR or the .comfyui-path file that scripts/setup.sh writes.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

from comfy_env import setup_comfy  # noqa: E402


def toy_loader(family, weights, seed):
    """The EliGen Toy Model Loader node's outputs (model, clip, vae)."""
    from comfyui_eligen.toyworld.models import load_toy_models

    return load_toy_models(family, weights, seed)


@record  # under torchrun, a failing rank's error and traceback go into torchrun's failure report
def main():
    # The device must be known before ComfyUI is imported; the full option parsing comes after.
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    device = early.parse_known_args()[0].device
    setup_comfy(device)
    from comfyui_eligen.training.headless import main as train_main

    train_main(sys.argv[1:], device=device, loaders={"EliGenToyModelLoader": toy_loader})


if __name__ == "__main__":
    main()
