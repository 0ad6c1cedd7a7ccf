"""Started by torchrun in tests/server/test_distributed.py, on toy models of a chosen dtype ("float32" or
"float64"), so a test pays ComfyUI's import once per rank:

    torchrun_worker.py jobs JSON             JSON: a list of {"run", "run_dir", "batch_size", "fsdp", "dtype"}
                                             trained one after the other in one process group
    torchrun_worker.py train DTYPE ARGS...   scripts/train.py's command line (ARGS) on toy models of DTYPE
"""

import functools
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "scripts"))

from comfy_env import setup_comfy  # noqa: E402

setup_comfy("cpu")

import torch  # noqa: E402

from comfyui_eligen.toyworld.models import load_toy_models  # noqa: E402
from comfyui_eligen.training import distributed, headless  # noqa: E402
from comfyui_eligen.training.run_file import load_run  # noqa: E402


def toy_loaders(dtype):
    return {"EliGenToyModelLoader": functools.partial(load_toy_models, dtype=getattr(torch, dtype))}


if sys.argv[1] == "train":
    headless.main(sys.argv[3:], loaders=toy_loaders(sys.argv[2]))
    sys.exit(0)

group = distributed.init_from_environment("cpu")
try:
    for job in json.loads(sys.argv[2]):
        group.fsdp = job["fsdp"]
        headless.run(load_run(job["run"]), headless.Options(run_dir=job["run_dir"], batch_size=job["batch_size"]),
                     group, loaders=toy_loaders(job.get("dtype", "float32")))
finally:
    group.close()
