"""EliGen training inside a real ComfyUI server on the toy FLUX:
- one graph trains, then samples with the trained MODEL through EliGen Apply and the stock KSampler;
  a branch on the base MODEL in the same graph sees no LoRA;
- the saved file, loaded with the stock LoraLoaderModelOnly, gives the same image;
- POST /interrupt during training leaves a checkpoint, and resume continues from it.
"""

import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from comfy_server import ServerError

pytestmark = pytest.mark.server
DATASET = "eligen_train_set"


@pytest.fixture(scope="module")
def server(comfy_server):
    folder = os.path.join(comfy_server.input_dir, DATASET)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(os.path.join(folder, f"img{i}.png"))
        top, bottom = np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.uint8)
        top[:32] = 255
        bottom[32:, 16:] = 255
        Image.fromarray(top).save(os.path.join(folder, f"img{i}_m0.png"))
        Image.fromarray(bottom).save(os.path.join(folder, f"img{i}_m1.png"))
        records.append({"image": f"img{i}.png", "prompt": "a red circle and a blue square",
                        "eligen_entity_prompts": ["red circle", "blue square"],
                        "eligen_entity_masks": [f"img{i}_m0.png", f"img{i}_m1.png"]})
    with open(os.path.join(folder, "metadata.json"), "w") as handle:
        json.dump(records, handle)
    Image.fromarray(top).save(os.path.join(comfy_server.input_dir, "entity_mask.png"))
    return comfy_server


def train_node(name, steps, resume="", checkpoint_every=0):
    return {"class_type": "EliGenTrain", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "lora_config": ["3", 0],
        "lora_name": name, "steps": steps, "learning_rate": 5e-3, "batch_size": 1, "grad_accumulation": 1,
        "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.01, "max_grad_norm": 1.0,
        "timestep_sampling": "reference", "entity_weight": 0.0, "precision": "fp32",
        "gradient_checkpointing": False, "entity_dropout": 0.0, "caption_dropout": 0.0, "seed": 0,
        "checkpoint_every": checkpoint_every, "validation_every": 0, "validation_steps": 2, "resume": resume,
        "write_reference_format": False, "cache": "memory", "entity_text_length": "real_length"}}


def common_nodes():
    return {
        "1": {"class_type": "EliGenToyModelLoader", "inputs": {"family": "flux", "weights": "random", "seed": 0}},
        "2": {"class_type": "EliGenDataset", "inputs": {"folder": DATASET, "max_pixels": 1048576}},
        "3": {"class_type": "EliGenLoraConfig", "inputs": {
            "rank": 4, "alpha": 4.0, "dropout": 0.0, "init": "kaiming", "preset": "eligen", "custom_pattern": "",
            "dtype": "float32"}},
    }


def sampling_branch(prefix, model, first_id):
    """EliGen Apply + stock KSampler + SaveImage on ``model``; node ids from ``first_id``."""
    a, b, c, d, e, f, g = (str(first_id + i) for i in range(7))
    return {
        a: {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle and a blue square", "clip": ["1", 1]}},
        b: {"class_type": "LoadImageMask", "inputs": {"image": "entity_mask.png", "channel": "red"}},
        c: {"class_type": "EliGenEntity", "inputs": {"mask": [b, 0], "clip": ["1", 1], "text": "red circle",
                                                     "text_length": "real_length"}},
        d: {"class_type": "EliGenApply", "inputs": {"model": model, "positive": [a, 0], "entities": [c, 0]}},
        e: {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        f: {"class_type": "KSampler", "inputs": {
            "model": [d, 0], "seed": 11, "steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": [d, 1], "negative": [d, 2], "latent_image": [e, 0], "denoise": 1.0}},
        g: {"class_type": "SaveImage", "inputs": {"images": [str(first_id + 7), 0], "filename_prefix": prefix}},
        str(first_id + 7): {"class_type": "VAEDecode", "inputs": {"samples": [f, 0], "vae": ["1", 2]}},
    }


def saved_image(server, entry, prefix):
    paths = [p for p in server.output_files(entry) if os.path.basename(p).startswith(prefix)]
    assert len(paths) == 1, paths
    return np.asarray(Image.open(paths[0]))


def test_train_then_sample_in_one_graph_and_with_the_stock_loader(server):
    graph = common_nodes()
    graph["10"] = train_node("srv_flux", steps=3)
    graph.update(sampling_branch("trained", ["10", 0], 20))
    graph.update(sampling_branch("base_branch", ["1", 0], 40))
    entry = server.run_workflow(graph, timeout=600)
    trained = saved_image(server, entry, "trained")
    base_branch = saved_image(server, entry, "base_branch")
    lora_file = os.path.join(server.models_dir, "loras", "srv_flux.safetensors")
    assert os.path.exists(lora_file)

    # The stock loader on the saved file gives the same image as the trainer's MODEL output.
    stock = common_nodes()
    stock["10"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["1", 0], "lora_name": "srv_flux.safetensors", "strength_model": 1.0}}
    stock.update(sampling_branch("stock_loader", ["10", 0], 20))
    stock.update(sampling_branch("plain_base", ["1", 0], 40))
    entry = server.run_workflow(stock, timeout=300)
    assert np.array_equal(saved_image(server, entry, "stock_loader"), trained)
    # The base branch of the training graph saw no LoRA; the trained LoRA changes the picture.
    plain = saved_image(server, entry, "plain_base")
    assert np.array_equal(base_branch, plain)
    assert not np.array_equal(trained, plain)


def test_interrupt_keeps_a_checkpoint_that_resumes(server):
    name = "srv_interrupt"
    run_dir = os.path.join(server.output_dir, "eligen_training", name)
    graph = common_nodes()
    graph["10"] = train_node(name, steps=100_000)
    graph["11"] = {"class_type": "PreviewImage", "inputs": {"images": ["10", 2]}}
    prompt_id = server.queue(graph)
    deadline = time.monotonic() + 240
    while "EliGen training: step 3/100000 " not in server.log_text():
        assert time.monotonic() < deadline, "training did not start:\n" + server.log_tail()
        time.sleep(0.2)
    server.interrupt()
    with pytest.raises(ServerError, match="interrupted"):
        server.wait(prompt_id, timeout=120)
    with open(os.path.join(run_dir, "latest.json")) as handle:
        pointer = json.load(handle)
    stopped_at = pointer["step"]
    assert stopped_at >= 3 and os.path.exists(os.path.join(run_dir, pointer["checkpoint"])), (pointer, os.listdir(run_dir))

    graph["10"] = train_node(name, steps=stopped_at + 2, resume="latest")
    log_before = len(server.log_text())  # the server is shared: look only at what this run logs
    server.run_workflow(graph, timeout=300)
    from safetensors import safe_open
    with safe_open(os.path.join(server.models_dir, "loras", name + ".safetensors"), framework="pt") as handle:
        meta = json.loads(handle.metadata()["eligen_training"])
    assert meta["steps_done"] == stopped_at + 2, (meta["steps_done"], stopped_at, server.log_tail())
    log = server.log_text()[log_before:]
    # The resumed run started after the checkpoint: its first reported step is stopped_at + 1.
    assert f"EliGen training: step {stopped_at + 1}/{stopped_at + 2}" in log, (stopped_at, log[-3000:])
    assert f"EliGen training: step 1/{stopped_at + 2}" not in log, (stopped_at, log[-3000:])


def test_bad_lora_name_is_refused_by_the_training_node_before_training(comfy_server):
    from test_reliability_kill import make_dataset

    make_dataset(comfy_server.input_dir, "reliability_set")  # its own folder on the shared server
    nodes = common_nodes()
    nodes["2"]["inputs"]["folder"] = "reliability_set"
    nodes["10"] = train_node("n" * 300, steps=50)
    log_before = len(comfy_server.log_text())
    with pytest.raises(ServerError) as error:
        comfy_server.run_workflow(nodes)
    message = str(error.value)
    assert "EliGenTrain" in message and "lora_name is 300 characters long" in message
    assert "EliGen training: step" not in comfy_server.log_text()[log_before:]  # refused before step 1
