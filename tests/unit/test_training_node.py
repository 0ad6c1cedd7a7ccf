"""The training node's work as plain functions, on the toy models: LoRA file in models/loras with the
settings in its metadata, the returned MODEL equal to the stock loader path, reference-format twin,
loss graph and validation outputs, and the node's input errors."""

import os

import pytest
import torch

import comfy.sd
from comfyui_eligen.core import lora_formats
from comfyui_eligen.nodes.training import EliGenLoraConfig, node_job, run_training
from comfyui_eligen.toyworld.models import load_toy_models
from comfyui_eligen.training import lora
from comfyui_eligen.training.dataset import dataset_from_images
from comfyui_eligen.training.outputs import plain_lora_name
from comfyui_eligen.training.runner import JobInputs
from comfyui_eligen.training.settings import TrainSettings


def toy_dataset(count=2):
    images = torch.rand(count, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2 * count, 64, 64)
    masks[0::2, :32] = 1
    masks[1::2, 32:, 32:] = 1
    return dataset_from_images(images, masks, "a red circle and a blue square", "red circle | blue square")


def velocity(model, x, sigma, context, y):
    """The patched model's output (stock apply_model) for fixed inputs."""
    import comfy.model_management
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    return model.model.apply_model(x, sigma, c_crossattn=context, y=y).detach().clone()


def test_run_training_saves_and_applies_the_lora(comfy_folders):
    output, loras = comfy_folders
    model, clip, vae = load_toy_models("flux", "random", seed=0)
    lora_settings = EliGenLoraConfig.execute(4, 4.0, 0.0, "kaiming", "eligen", "float32").result[0]
    settings = TrainSettings(steps=3, learning_rate=5e-3, validation_every=3, validation_steps=2, precision="bf16",
                             gradient_checkpointing=True)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    context, pooled = torch.randn(1, 5, 64), torch.randn(1, 64)
    sigma = torch.tensor([0.7])
    before = velocity(model, x, sigma, context, pooled)

    dataset = toy_dataset()
    out = run_training(node_job(dataset, lora_settings, settings, "my_lora", write_reference_format=True, cache="off",
                                entity_text_length="real_length"), JobInputs(model, clip, vae, dataset))

    assert out["lora_name"] == "my_lora.safetensors"
    path = os.path.join(loras, "my_lora.safetensors")
    assert out["path"] == path and sorted(os.listdir(loras)) == ["my_lora.safetensors", "my_lora_reference.safetensors"]
    saved = lora_formats.load_lora(path)
    meta = lora_formats.load_lora_metadata(path)["eligen_training"]
    assert meta["lora"]["rank"] == 4 and meta["train"]["steps"] == 3 and meta["steps_done"] == 3
    assert meta["family"] == "flux" and meta["train"]["precision"] == "bf16"
    assert lora_formats.detect_format(lora_formats.load_lora(os.path.join(loras, "my_lora_reference.safetensors"))) == "kohya"
    assert lora_formats.stock_unmatched_keys(saved, lora_formats.model_key_map(model)) == []
    run_dir = os.path.join(output, "eligen_training", "my_lora")
    assert {"latest.json", "loss.png", "validation_000003_0.png"} <= set(os.listdir(run_dir))

    # The returned MODEL is the stock loader path on the saved file; the input MODEL is untouched.
    stock, _ = comfy.sd.load_lora_for_models(model.clone(), None, lora_formats.load_lora(path), 1.0, 0)
    trained = velocity(out["model"], x, sigma, context, pooled)
    assert torch.equal(trained, velocity(stock, x, sigma, context, pooled))
    assert not torch.equal(trained, before)
    assert torch.equal(velocity(model, x, sigma, context, pooled), before)

    assert out["loss_graph"].shape[0] == 1 and out["loss_graph"].shape[-1] == 3
    assert out["validation"].shape == (1, 64, 64, 3)


@pytest.mark.parametrize("name, reason", [("", "not empty"), ("../evil", "no folders: it contains a path separator"),
                                          ("sub/dir", "no folders"), (".hidden", "not starting with a dot"),
                                          ("a:b", "no special characters: :")])
def test_bad_lora_names_are_refused(name, reason):
    with pytest.raises(ValueError, match="lora_name .* must be a plain file name") as error:
        plain_lora_name(name)
    assert reason in str(error.value)
    assert plain_lora_name("fine_name.safetensors") == "fine_name"


def test_node_input_errors_name_the_input(comfy_folders):
    model, clip, vae = load_toy_models("flux", "random", seed=0)
    good = lora.LoraSettings(rank=2, alpha=2)
    dataset = toy_dataset(1)
    with pytest.raises(ValueError, match="preset 'custom' needs a custom_pattern"):
        EliGenLoraConfig.execute(4, 4.0, 0.0, "kaiming", "custom", "float32")
    with pytest.raises(ValueError, match="cache 'sometimes' is not one of"):
        run_training(node_job(dataset, good, TrainSettings(steps=1), "x", cache="sometimes"),
                     JobInputs(model, clip, vae, dataset))
    with pytest.raises(ValueError, match="EliGen supports FLUX.1 and Qwen-Image"):
        run_training(node_job(dataset, good, TrainSettings(steps=1), "x"), JobInputs(clip.patcher, clip, vae, dataset))
    with pytest.raises(ValueError, match="is not of the form step_"):
        run_training(node_job(dataset, good, TrainSettings(steps=1), "x"), JobInputs(model, clip, vae, dataset),
                     resume="../../secrets")


def test_validation_sample_takes_the_given_prompt_and_entities():
    from comfyui_eligen.core.conditioning import Entity
    from comfyui_eligen.training.sample import Sample
    from comfyui_eligen.training.validation import validation_sample

    first = Sample(torch.zeros(16, 8, 8), torch.ones(1, 4, 64), torch.ones(1, 64), [torch.ones(1, 2, 64)],
                   torch.ones(1, 64, 64))
    assert validation_sample(first) is first
    mask = torch.zeros(32, 32)
    mask[:16] = 1  # top half, at another resolution than the training images
    entities = (Entity(torch.full((1, 3, 64), 2.0), mask, "red circle"),
                Entity(torch.full((1, 5, 64), 3.0), 1 - mask, "blue square"))
    positive = [[torch.full((1, 6, 64), 4.0), {"pooled_output": torch.full((1, 64), 5.0)}]]
    sample = validation_sample(first, positive, entities)
    assert sample.latent is first.latent and sample.context.shape == (1, 6, 64) and sample.pooled[0, 0] == 5.0
    assert [e.shape[1] for e in sample.entity_embeds] == [3, 5]
    assert sample.masks.shape == (2, 64, 64)
    assert sample.masks[0, :32].eq(1).all() and sample.masks[0, 32:].eq(0).all()
    assert torch.equal(sample.masks[1], 1 - sample.masks[0])
