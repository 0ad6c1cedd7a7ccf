"""Started by torchrun in tests/server/test_distributed.py: trains several run files in one process group, so a
test pays ComfyUI's import once per rank. argv[1]: JSON list of {"run", "run_dir", "batch_size", "fsdp"}."""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "scripts"))

from comfy_env import setup_comfy  # noqa: E402

setup_comfy("cpu")

from comfyui_eligen.toyworld.models import load_toy_models  # noqa: E402
from comfyui_eligen.training import distributed, headless  # noqa: E402
from comfyui_eligen.training.run_file import load_run  # noqa: E402

group = distributed.init_from_environment("cpu")
try:
    for job in json.loads(sys.argv[1]):
        group.fsdp = job["fsdp"]
        headless.run(load_run(job["run"]), headless.Options(run_dir=job["run_dir"], batch_size=job["batch_size"]),
                     group, loaders={"EliGenToyModelLoader": load_toy_models})
finally:
    group.close()
