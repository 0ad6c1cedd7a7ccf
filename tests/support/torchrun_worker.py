"""Started by torchrun in tests/server/test_distributed.py, on shallow toy models (shallow_toys.py) of a
chosen dtype ("float32" or "float64"), so a test pays ComfyUI's import once per rank:

    torchrun_worker.py jobs JSON             JSON: a list of {"world", "store", "jobs"}: each entry's jobs
                                             ({"run", "run_dir", "batch_size", "fsdp", "dtype"}) trained one
                                             after the other in one process group of its first "world" ranks
    torchrun_worker.py train DTYPE ARGS...   scripts/train.py's command line (ARGS) on toy models of DTYPE

A "world" smaller than the launch's is a process group of ranks 0..world-1 made here over a file store
("store": a path not yet used); the other ranks skip those jobs. The launch's own world is joined the
product's way (training.distributed.init_from_environment).
"""

import datetime
import functools
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "scripts"))

from comfy_env import setup_comfy  # noqa: E402

setup_comfy("cpu")

import torch  # noqa: E402

from comfyui_eligen.training import distributed, headless  # noqa: E402
from comfyui_eligen.training.run_file import load_run  # noqa: E402
from shallow_toys import load_shallow_toy_models  # noqa: E402  (beside this file)


def toy_loaders(dtype):
    return {"EliGenToyModelLoader": functools.partial(load_shallow_toy_models, dtype=getattr(torch, dtype))}


def join(world, store):
    """The Group of the first ``world`` ranks of this launch; None on the ranks left out."""
    if world == int(os.environ["WORLD_SIZE"]):
        return distributed.init_from_environment("cpu")
    rank = int(os.environ["RANK"])
    if rank >= world:
        return None
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(minutes=10))
    return distributed.Group(rank, world, rank, "gloo", torch.device("cpu"))


if sys.argv[1] == "train":
    headless.main(sys.argv[3:], loaders=toy_loaders(sys.argv[2]))
    sys.exit(0)

for block in json.loads(sys.argv[2]):
    group = join(block["world"], block["store"])
    if group is None:
        continue
    try:
        for job in block["jobs"]:
            group.fsdp = job["fsdp"]
            headless.run(load_run(job["run"]), headless.Options(run_dir=job["run_dir"], batch_size=job["batch_size"]),
                         group, loaders=toy_loaders(job.get("dtype", "float32")))
    finally:
        group.close()
