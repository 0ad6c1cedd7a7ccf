"""The weights build script keeps working (a few steps) and its file loads as the pretrained toy model;
the shipped files themselves are checked in tests/unit/test_toyworld_models.py."""

import json
import math
import os

import safetensors
import torch

from comfyui_eligen.lab import build_weights
from comfyui_eligen.toyworld import models


def _tensors(path):
    with safetensors.safe_open(path, framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata()


def test_a_few_build_steps_are_deterministic_and_load_as_pretrained(tmp_path):
    argv = ["--steps", "3", "--batch", "4", "--pool", "12", "--warmup", "1", "--log-every", "1", "--threads", "0"]
    paths = [build_weights.main(argv + ["--out", str(tmp_path / f"run{i}.safetensors")]) for i in range(2)]
    first, metadata = _tensors(paths[0])
    second, _ = _tensors(paths[1])
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    info = json.loads(metadata["toy_world"])
    assert info["steps"] == 3 and math.isfinite(info["final_loss"]) and info["seconds"] > 0
    # training moved the layers that start at zero (adaLN-zero), so gradients reached the output layer
    assert first["diffusion_model.final_layer.linear.weight"].abs().sum() > 0
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]  # no temp files left

    model, clip, _ = models.load_toy_models("flux", "pretrained", weights_file=paths[0])
    loaded = model.model.diffusion_model.state_dict()
    assert all(torch.equal(loaded[k], first["diffusion_model." + k]) for k in loaded)
    assert torch.equal(clip.cond_stage_model.word_table, first["text_encoder.word_table"])
