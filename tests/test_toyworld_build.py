"""The weights build script keeps working (a few steps), and the shipped weights fit the toy model."""

import json
import math
import os

import pytest
import safetensors
import torch

from comfyui_eligen.toyworld import build_weights, data, models


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


def test_shipped_weights_stay_small():
    folder = models.WEIGHTS_DIR
    assert sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)) <= 25 * 1024 * 1024


@pytest.mark.parametrize("family", sorted(models.FAMILIES))
def test_shipped_weights_fit_and_state_their_recipe(family):
    tensors, metadata = _tensors(models.weights_path(family))
    info = json.loads(metadata["toy_world"])
    assert info["family"] == family and info["seconds"] > 0
    assert data.SIZE in info["image_sizes"]  # trained at the world's image size (16x16 tokens)
    # a fine-tune keeps the recipe it started from: back to the pretraining from scratch, which fitted
    chain = [info]
    while chain[-1].get("init_recipe"):
        chain.append(chain[-1]["init_recipe"])
    assert chain[-1]["family"] == family and chain[-1]["final_loss"] < 0.1 * chain[-1]["first_loss"]
    assert info["final_loss"] < 2 * chain[-1]["final_loss"]
    model = models.load_toy_models(family, "pretrained")[0]
    assert set(model.model.diffusion_model.state_dict()) == {k[len("diffusion_model."):] for k in tensors if k.startswith("diffusion_model.")}


def test_missing_weights_file_says_how_to_build_it(tmp_path):
    with pytest.raises(ValueError, match="missing.*build-weights|build_weights"):
        models.load_toy_models("flux", "pretrained", weights_file=str(tmp_path / "none.safetensors"))
