"""A graph in a real ComfyUI server exports its run file; the headless trainer (no server) reproduces the
node's LoRA from it, and the stock LoraLoaderModelOnly loads the headless result in a graph."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from comfyui_eligen.toyworld.data import write_dataset
from comfyui_eligen.toyworld.models import load_toy_models
from comfyui_eligen.training import headless
from comfyui_eligen.training.run_file import load_run

pytestmark = pytest.mark.server
DATASET = "eligen_run_file_set"
NAME = "run_file_lora"


def graph_nodes(family):
    return {
        "1": {"class_type": "EliGenToyModelLoader", "inputs": {"family": family, "weights": "random", "seed": 0}},
        "2": {"class_type": "EliGenDataset", "inputs": {"folder": DATASET, "max_pixels": 4096}},
        "3": {"class_type": "EliGenLoraConfig", "inputs": {
            "rank": 2, "alpha": 2.0, "dropout": 0.0, "init": "kaiming", "preset": "eligen", "custom_pattern": "",
            "dtype": "float32"}},
    }


def train_node(name):
    return {"class_type": "EliGenTrain", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "lora_config": ["3", 0],
        "lora_name": name, "steps": 3, "learning_rate": 1e-2, "batch_size": 2, "grad_accumulation": 1,
        "schedule": "cosine", "warmup_steps": 1, "weight_decay": 0.01, "max_grad_norm": 1.0,
        "timestep_sampling": "reference", "entity_weight": 0.5, "precision": "fp32",
        "gradient_checkpointing": False, "entity_dropout": 0.2, "caption_dropout": 0.2, "seed": 4,
        "checkpoint_every": 0, "validation_every": 0, "validation_steps": 2, "resume": "",
        "write_reference_format": False, "cache": "memory", "entity_text_length": "real_length"}}


def sample_with_lora(lora_name, prefix):
    """Toy model + stock LoraLoaderModelOnly + stock text encode, KSampler, VAEDecode, SaveImage."""
    graph = graph_nodes("flux")
    graph.update({
        "10": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora_name,
                                                               "strength_model": 1.0}},
        "11": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
        "12": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "13": {"class_type": "KSampler", "inputs": {
            "model": ["10", 0], "seed": 3, "steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["11", 0], "negative": ["11", 0], "latent_image": ["12", 0], "denoise": 1.0}},
        "14": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["1", 2]}},
        "15": {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": prefix}},
    })
    for key in ("2", "3"):
        del graph[key]
    return graph


def saved_image(server, entry, prefix):
    paths = [p for p in server.output_files(entry) if os.path.basename(p).startswith(prefix)]
    assert len(paths) == 1, paths
    return np.asarray(Image.open(paths[0]))


def test_headless_trainer_reproduces_the_node_from_its_run_file(comfy_server, tmp_path):
    write_dataset(os.path.join(comfy_server.input_dir, DATASET), 3, seed=1, split="train", size=32)
    graph = graph_nodes("flux")
    graph["9"] = train_node(NAME)
    comfy_server.run_workflow(graph, timeout=600)
    run_path = os.path.join(comfy_server.output_dir, "eligen_training", NAME, "run.json")
    job = load_run(run_path)
    assert job.model.loader == "EliGenToyModelLoader" and job.train.seed == 4
    with open(run_path) as handle:
        assert json.load(handle)["version"] == 1

    done = headless.run(job, headless.Options(run_dir=str(tmp_path / "headless")),
                        loaders={"EliGenToyModelLoader": load_toy_models})
    result, path = done.result, done.lora_path
    node_lora = load_file(os.path.join(comfy_server.models_dir, "loras", NAME + ".safetensors"))
    headless_lora = load_file(path)
    assert node_lora.keys() == headless_lora.keys() and result.step == 3
    difference = max((node_lora[k] - headless_lora[k]).abs().max().item() for k in node_lora)
    assert difference <= 1e-6, difference
    assert max(v.abs().max().item() for k, v in node_lora.items() if "lora_up" in k) > 1e-4  # it trained

    # The stock loader takes the headless file, and it samples like the node's own file.
    shutil.copy(path, os.path.join(comfy_server.models_dir, "loras", "headless_" + NAME + ".safetensors"))
    log_start = len(comfy_server.log_text())  # the server is shared: look only at what these runs log
    entry = comfy_server.run_workflow(sample_with_lora("headless_" + NAME + ".safetensors", "headless_lora"))
    from_headless = saved_image(comfy_server, entry, "headless_lora")
    entry = comfy_server.run_workflow(sample_with_lora(NAME + ".safetensors", "node_lora"))
    assert np.array_equal(from_headless, saved_image(comfy_server, entry, "node_lora"))
    assert "lora key not loaded" not in comfy_server.log_text()[log_start:]
