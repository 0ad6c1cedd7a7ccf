"""``kill -9`` of the ComfyUI process while it writes a LoRA, then a restart.

A second server of its own (not the shared session one, which other tests keep using) trains a large
LoRA, then resumes it; the moment the final LoRA's temp file appears in ``models/loras`` the whole
server is killed with SIGKILL, so the write is cut off half-way. After a restart on the same folders:
no temp file is offered by LoraLoaderModelOnly or EliGen LoRA Loader, the previous LoRA file is intact,
and resuming the run finishes it (removing the dead process's temp folder, with safetensors' own
temp file inside it).
"""

import hashlib
import json
import os
import signal
import time

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from comfy_server import ComfyServer, PACKAGE_NAME
from test_training_server import DATASET, common_nodes, train_node

pytestmark = pytest.mark.server
NAME = "killed_mid_save"
RANK = 512  # all block linears of the toy FLUX at this rank: a LoRA of ~40 MB, written in tens of ms


def make_dataset(input_dir, name=DATASET):
    folder = os.path.join(input_dir, name)
    os.makedirs(folder, exist_ok=True)
    top = np.zeros((64, 64), np.uint8)
    top[:32] = 255
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(os.path.join(folder, "img0.png"))
    Image.fromarray(top).save(os.path.join(folder, "m0.png"))
    with open(os.path.join(folder, "metadata.json"), "w") as handle:
        json.dump([{"image": "img0.png", "prompt": "a red circle", "eligen_entity_prompts": ["red circle"],
                    "eligen_entity_masks": ["m0.png"]}], handle)


def graph(steps, resume=""):
    nodes = common_nodes()
    nodes["3"]["inputs"].update(rank=RANK, alpha=float(RANK), preset="all_block_linears")
    nodes["10"] = train_node(NAME, steps=steps, resume=resume, checkpoint_every=1)
    return nodes


def temps(folder):
    return [name for name in os.listdir(folder) if name.startswith(".eligen-tmp.")]


def digest(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def steps_done(path):
    with safe_open(path, framework="pt") as handle:
        return json.loads(handle.metadata()["eligen_training"])["steps_done"]


def restart(server, tmp_path, n):
    """A new server process on the same folders (the old one is dead)."""
    os.unlink(os.path.join(server.custom_nodes_dir, PACKAGE_NAME))
    fresh = ComfyServer(log_path=str(tmp_path / f"comfy_kill_{n}.log"), torch_threads=1)
    os.rmdir(fresh.base_dir)
    fresh.base_dir = server.base_dir
    return fresh.start()


def test_kill_during_lora_save_then_restart_and_resume(tmp_path):
    server = ComfyServer(log_path=str(tmp_path / "comfy_kill_0.log"), torch_threads=1).start()
    loras = os.path.join(server.models_dir, "loras")
    lora_file = os.path.join(loras, NAME + ".safetensors")
    try:
        make_dataset(server.input_dir)
        server.run_workflow(graph(steps=1), timeout=600)
        before = digest(lora_file)
        assert steps_done(lora_file) == 1

        killed, attempt = False, 0
        while not killed:
            attempt += 1
            assert attempt <= 3, "the kill never landed during the LoRA write"
            prompt_id = server.queue(graph(steps=1 + attempt, resume="latest"))
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                if temps(loras):  # the final LoRA is being written: cut it off
                    os.killpg(server.process.pid, signal.SIGKILL)
                    server.process.wait()
                    break
                if server.history(prompt_id):
                    break  # finished before we saw the write (the machine was too busy): try again
                time.sleep(0.001)
            killed = server.process.poll() is not None and bool(temps(loras))
            if server.process.poll() is not None:
                assert killed or digest(lora_file) != before
                if not killed:
                    server = restart(server, tmp_path, attempt)
            before = digest(lora_file)
        left = temps(loras)
        assert left and all(name.endswith(".part") for name in left)
        # whatever the write had made (safetensors' own .tmpXXXXXX included) is inside its temp folder
        assert [name for name in os.listdir(loras) if name.startswith(".")] == left
        assert digest(lora_file) == before and steps_done(lora_file) == attempt  # the old file is whole

        server = restart(server, tmp_path, 10)
        info = server.object_info()
        for node in ("LoraLoaderModelOnly", "EliGenLoraLoader"):
            listed = info[node]["input"]["required"]["lora_name"]
            names = listed[0] if isinstance(listed[0], list) else listed[1]["options"]
            assert NAME + ".safetensors" in names, (node, names)
            assert not [n for n in names if "eligen-tmp" in n or n.endswith(".part")], (node, names)

        server.run_workflow(graph(steps=attempt + 2, resume="latest"), timeout=600)
        assert steps_done(lora_file) == attempt + 2
        assert temps(loras) == []  # the dead process's temp folder was removed
        assert [name for name in os.listdir(loras) if name.startswith(".")] == []  # and nothing else was left
    finally:
        server.stop()
