"""EliGenLoraLoader in a real ComfyUI: a file in DiffSynth-Studio's internal FLUX names (which the stock
loader drops) gives exactly the image its kohya twin gives through the stock LoraLoaderModelOnly."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_server import ServerError

from comfyui_eligen.core import lora_formats as lf
from comfyui_eligen.toyworld import models as toy

RANK = 4
INTERNAL = {"img_attn.qkv": "attn.a_to_qkv", "txt_attn.proj": "attn.b_to_out", "img_mlp.0": "ff_a.0",
            "linear1": "to_qkv_mlp", "linear2": "proj_out"}


@pytest.fixture(scope="module")
def server(comfy_server):
    return comfy_server


def toy_flux_loras():
    """(internal-name file, kohya twin) for the toy FLUX: big enough to change the picture."""
    model = toy.build_diffusion_model("flux").diffusion_model
    generator = torch.Generator().manual_seed(0)
    internal, kohya = {}, {}
    for module, name in model.named_modules():
        kind, _, rest = module.partition(".")
        index, _, inner = rest.partition(".")
        if kind not in ("double_blocks", "single_blocks") or inner not in INTERNAL:
            continue
        up = torch.randn(name.out_features, RANK, generator=generator) * 0.5
        down = torch.randn(RANK, name.in_features, generator=generator) * 0.5
        reference = f"{'blocks' if kind == 'double_blocks' else 'single_blocks'}.{index}.{INTERNAL[inner]}"
        internal[f"{reference}.lora_B.default.weight"], internal[f"{reference}.lora_A.default.weight"] = up, down
        key = "lora_unet_" + module.replace(".", "_")
        kohya[f"{key}.lora_up.weight"], kohya[f"{key}.lora_down.weight"] = up, down
        kohya[f"{key}.alpha"] = torch.tensor(float(RANK))
    assert len(internal) == 2 * (2 * 3 + 2 * 2)
    return internal, kohya


def graph(loader, lora_name, strength=1.0):
    strength_input = "strength" if loader == "EliGenLoraLoader" else "strength_model"
    return {
        "1": {"class_type": "EliGenToyModelLoader", "inputs": {"family": "flux", "weights": "random", "seed": 0}},
        "2": {"class_type": loader, "inputs": {"model": ["1", 0], "lora_name": lora_name, strength_input: strength}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "seed": 3, "steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"lora_{loader}_{strength}"}},
    }


def render(server, loader, lora_name, strength=1.0):
    entry = server.run_workflow(graph(loader, lora_name, strength))
    (path,) = server.output_files(entry)
    return torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32))


def test_loader_applies_internal_names_like_the_stock_loader_applies_kohya(server):
    internal, kohya = toy_flux_loras()
    loras = os.path.join(server.models_dir, "loras")
    lf.save_lora(os.path.join(loras, "toy_internal.safetensors"), internal)
    lf.save_lora(os.path.join(loras, "toy_kohya.safetensors"), kohya)

    ours = render(server, "EliGenLoraLoader", "toy_internal.safetensors")
    stock_kohya = render(server, "LoraLoaderModelOnly", "toy_kohya.safetensors")
    plain = render(server, "EliGenLoraLoader", "toy_internal.safetensors", strength=0.0)
    stock_internal = render(server, "LoraLoaderModelOnly", "toy_internal.safetensors")

    assert torch.equal(ours, stock_kohya)
    assert (ours - plain).abs().mean() > 2.0  # the LoRA visibly changes the picture (0-255 scale)
    # The stock loader drops every internal-name key: its picture is the one without a LoRA.
    assert torch.equal(stock_internal, plain)
    assert "lora key not loaded: blocks.0.attn.a_to_qkv.lora_A.default.weight" in server.log_text()


def test_loader_names_keys_the_model_has_no_place_for(server):
    internal, _ = toy_flux_loras()
    internal["blocks.0.attn.a_to_nowhere.lora_A.default.weight"] = torch.zeros(RANK, 128)
    internal["blocks.0.attn.a_to_nowhere.lora_B.default.weight"] = torch.zeros(128, RANK)
    lf.save_lora(os.path.join(server.models_dir, "loras", "toy_bad.safetensors"), internal)
    with pytest.raises(ServerError) as error:
        server.run_workflow(graph("EliGenLoraLoader", "toy_bad.safetensors"))
    message = str(error.value)
    assert "EliGenLoraLoader" in message and "toy_bad.safetensors" in message
    assert "'blocks.0.attn.a_to_nowhere.lora_A.default.weight'" in message and "2 key(s)" in message


# A few of the broken-file cases of tests/unit/test_reliability_inputs.py through the server: the message
# reaches the user and names the item.

SERVER_LORA_CASES = [
    ("up-without-down", {"double_blocks.0.img_attn.qkv.lora_up.weight": torch.zeros(384, 2)}, "has no lora_down"),
    ("extra-mid", {"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(384, 2),
                   "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 128),
                   "lora_unet_double_blocks_0_img_attn_qkv.lora_mid.weight": torch.zeros(2, 2)},
     "'lora_unet_double_blocks_0_img_attn_qkv.lora_mid.weight': a lora_mid (LoCon Tucker) tensor"),
    ("diff-shape", {"lora_unet_double_blocks_0_img_attn_qkv.diff": torch.zeros(384, 127)},
     "'lora_unet_double_blocks_0_img_attn_qkv.diff' has shape (384, 127) but the model's"),
    ("nan-alpha", {"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(384, 2),
                   "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 128),
                   "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(float("nan"))}, "NaN or inf"),
]


@pytest.mark.parametrize("case", SERVER_LORA_CASES, ids=[c[0] for c in SERVER_LORA_CASES])
def test_bad_lora_files_through_the_server(comfy_server, case):
    name, state_dict, expected = case
    file_name = f"bad_{name}.safetensors"
    lf.save_lora(os.path.join(comfy_server.models_dir, "loras", file_name), state_dict)
    with pytest.raises(ServerError) as error:
        comfy_server.run_workflow(graph("EliGenLoraLoader", file_name))
    message = str(error.value)
    assert "EliGenLoraLoader" in message and file_name in message and expected in message
    assert "KeyError" not in message
