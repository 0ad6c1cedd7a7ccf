"""LoRA key formats on real-size FLUX.1-dev and Qwen-Image built on the meta device.

The LoRA tensors are small real CPU tensors (rank 2) with the exact released key names and shapes that fit
the real modules, so ComfyUI's own loader (what LoraLoaderModelOnly runs) is the judge of "zero unmatched".
"""

import json
import os

import pytest
import torch

import comfy.lora
import comfy.supported_models

from comfyui_eligen.core import lora_formats as lf

RANK = 2
FLUX_DEV_CONFIG = dict(
    image_model="flux", in_channels=16, patch_size=2, out_channels=16, vec_in_dim=768, context_in_dim=4096,
    hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
    theta=10000, qkv_bias=True, guidance_embed=True,
)
QWEN_IMAGE_CONFIG = dict(image_model="qwen_image", in_channels=64, num_layers=60)
# EliGen targets in ComfyUI module names (eligen.md).
FLUX_DOUBLE = ["img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj", "img_mlp.0", "img_mlp.2",
               "txt_mlp.0", "txt_mlp.2", "img_mod.lin", "txt_mod.lin"]
FLUX_SINGLE = ["linear1", "linear2", "modulation.lin"]
QWEN_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                "attn.to_out.0", "attn.to_add_out", "img_mlp.net.2", "txt_mlp.net.2", "img_mod.1", "txt_mod.1"]
# ComfyUI name -> DiffSynth-Studio's internal FLUX name (eligen.md), written out independently of the code.
FLUX_INTERNAL = {"img_attn.qkv": "attn.a_to_qkv", "txt_attn.qkv": "attn.b_to_qkv", "img_attn.proj": "attn.a_to_out",
                 "txt_attn.proj": "attn.b_to_out", "img_mlp.0": "ff_a.0", "img_mlp.2": "ff_a.2",
                 "txt_mlp.0": "ff_b.0", "txt_mlp.2": "ff_b.2", "img_mod.lin": "norm1_a.linear",
                 "txt_mod.lin": "norm1_b.linear", "linear1": "to_qkv_mlp", "linear2": "proj_out",
                 "modulation.lin": "norm.linear"}


def meta_model(model_class, unet_config):
    config = model_class(dict(unet_config))
    config.set_inference_dtype(torch.bfloat16, None)
    return config.get_model({}, device=torch.device("meta"))


@pytest.fixture(scope="module")
def flux():
    return meta_model(comfy.supported_models.Flux, FLUX_DEV_CONFIG)


@pytest.fixture(scope="module")
def qwen():
    return meta_model(comfy.supported_models.QwenImage, QWEN_IMAGE_CONFIG)


def flux_targets(model):
    names = [f"double_blocks.{i}.{m}" for i in range(model.diffusion_model.params.depth) for m in FLUX_DOUBLE]
    names += [f"single_blocks.{i}.{m}" for i in range(model.diffusion_model.params.depth_single_blocks)
              for m in FLUX_SINGLE]
    return names


def qwen_targets(model):
    return [f"transformer_blocks.{i}.{m}" for i in range(len(model.diffusion_model.transformer_blocks))
            for m in QWEN_TARGETS]


def lora_pair(model, module, seed):
    """(up [out, rank], down [rank, in]) fitting the real module."""
    layer = model.diffusion_model.get_submodule(module)
    generator = torch.Generator().manual_seed(seed)
    up = torch.randn(layer.out_features, RANK, generator=generator)
    down = torch.randn(RANK, layer.in_features, generator=generator)
    return up, down


def kohya_file(model, modules, alpha=1.0):
    sd = {}
    for seed, module in enumerate(modules):
        up, down = lora_pair(model, module, seed)
        name = "lora_unet_" + module.replace(".", "_")
        sd[name + ".lora_up.weight"], sd[name + ".lora_down.weight"] = up, down
        sd[name + ".alpha"] = torch.tensor(alpha)
    return sd


def peft_file(model, modules, rename=lambda m: m, adapter_name=".default"):
    sd = {}
    for seed, module in enumerate(modules):
        up, down = lora_pair(model, module, seed)
        sd[f"{rename(module)}.lora_B{adapter_name}.weight"] = up
        sd[f"{rename(module)}.lora_A{adapter_name}.weight"] = down
    return sd


def internal_flux_name(module):
    kind, index, name = module.split(".", 2)
    return f"{'blocks' if kind == 'double_blocks' else 'single_blocks'}.{index}.{FLUX_INTERNAL[name]}"


def stock_patches(sd, model):
    """What ComfyUI's LoRA loader builds from this file for this model: {weight key: adapter}."""
    return comfy.lora.load_lora(sd, comfy.lora.model_lora_keys_unet(model, {}), log_missing=False)


def stock_delta(patch, shape):
    """The weight change the stock adapter applies (strength 1) to a zero weight of this shape."""
    return patch.calculate_weight(torch.zeros(shape), "w", 1.0, 1.0, None, lambda x: x)


def test_flux_kohya_all_304_targets_load_through_the_stock_loader(flux):
    modules = flux_targets(flux)
    assert len(modules) == 304
    sd = kohya_file(flux, modules)
    assert lf.detect_format(sd) == "kohya"
    key_map = lf.model_key_map(flux)
    assert lf.stock_unmatched_keys(sd, key_map) == []
    patches = stock_patches(sd, flux)
    assert sorted(patches) == sorted(f"diffusion_model.{m}.weight" for m in modules)

    converted = lf.to_comfy_for_model(sd, flux)
    assert len(converted) == len(sd)
    up, down = lora_pair(flux, "single_blocks.37.linear1", modules.index("single_blocks.37.linear1"))
    assert torch.equal(converted["diffusion_model.single_blocks.37.linear1.lora_up.weight"], up)
    assert torch.equal(converted["diffusion_model.single_blocks.37.linear1.lora_down.weight"], down)
    assert lf.stock_unmatched_keys(converted, key_map) == []


@pytest.mark.parametrize("adapter_name", [".default", ""])
def test_flux_diffsynth_internal_names_need_and_get_our_conversion(flux, adapter_name):
    modules = flux_targets(flux)
    sd = peft_file(flux, modules, rename=internal_flux_name, adapter_name=adapter_name)
    assert lf.detect_format(sd) == "diffsynth_flux"
    key_map = lf.model_key_map(flux)
    # The stock loader drops every one of these keys ...
    assert lf.stock_unmatched_keys(sd, key_map) == list(sd)
    # ... ours places all of them, onto the same weights the kohya file patches, with the same matrices.
    converted = lf.to_comfy_for_model(sd, flux)
    assert lf.stock_unmatched_keys(converted, key_map) == []
    ours = stock_patches(converted, flux)
    reference = stock_patches(kohya_file(flux, modules, alpha=float(RANK)), flux)
    assert sorted(ours) == sorted(reference)
    for key in ("diffusion_model.double_blocks.3.txt_mod.lin.weight", "diffusion_model.single_blocks.0.linear2.weight"):
        assert torch.equal(ours[key].weights[0], reference[key].weights[0])
        assert torch.equal(ours[key].weights[1], reference[key].weights[1])
        assert ours[key].weights[2] == RANK  # peft without alpha = scale 1, kept explicit


def test_qwen_image_peft_default_720_targets_load_through_the_stock_loader(qwen):
    modules = qwen_targets(qwen)
    assert len(modules) == 720
    # The released files hold 235.9M parameters at rank 32 (eligen.md): the same 720 modules.
    layers = [qwen.diffusion_model.get_submodule(m) for m in modules]
    assert round(sum(32 * (layer.in_features + layer.out_features) for layer in layers) / 1e5) == 2359
    sd = peft_file(qwen, modules)
    assert lf.detect_format(sd) == "peft"
    key_map = lf.model_key_map(qwen)
    assert lf.stock_unmatched_keys(sd, key_map) == []
    patches = stock_patches(sd, qwen)
    assert sorted(patches) == sorted(f"diffusion_model.{m}.weight" for m in modules)

    converted = lf.to_comfy_for_model(sd, qwen)
    assert len(converted) == len(sd) * 3 // 2  # up, down, plus an explicit alpha per module
    module = "transformer_blocks.59.attn.to_add_out"
    weight = f"diffusion_model.{module}.weight"
    shape = qwen.state_dict()[weight].shape
    # Same weight change as the released file (scale 1: no alpha there, alpha = rank here).
    assert torch.allclose(stock_delta(stock_patches(converted, qwen)[weight], shape), stock_delta(patches[weight], shape))


def test_module_extras_follow_their_module(flux):
    # A DoRA scale beside internal-name matrices must be renamed with them, or the stock loader drops it.
    sd = peft_file(flux, ["single_blocks.4.linear2"], rename=internal_flux_name)
    sd["single_blocks.4.proj_out.dora_scale"] = torch.ones(3072, 1)
    converted = lf.to_comfy_for_model(sd, flux)
    assert "diffusion_model.single_blocks.4.linear2.dora_scale" in converted
    assert lf.stock_unmatched_keys(converted, lf.model_key_map(flux)) == []
    patch = stock_patches(converted, flux)["diffusion_model.single_blocks.4.linear2.weight"]
    assert patch.weights[4] is converted["diffusion_model.single_blocks.4.linear2.dora_scale"]


def test_keys_the_stock_loader_maps_onto_fused_slices_are_kept(flux):
    # Diffusers FLUX names: split q/k/v that the stock loader writes into slices of the fused qkv.
    sd = {f"transformer.transformer_blocks.0.attn.to_{x}.lora_{ab}.weight": torch.zeros(shape)
          for x in "qkv" for ab, shape in (("A", (RANK, 3072)), ("B", (3072, RANK)))}
    converted = lf.to_comfy_for_model(sd, flux)
    assert set(sd) <= set(converted)
    assert lf.stock_unmatched_keys(converted, lf.model_key_map(flux)) == []


def test_unknown_key_raises_naming_it(flux):
    sd = kohya_file(flux, ["double_blocks.0.img_attn.qkv"])
    sd["lora_unet_double_blocks_0_img_attn_nonexistent.lora_up.weight"] = torch.zeros(3, RANK)
    sd["lora_unet_double_blocks_0_img_attn_nonexistent.lora_down.weight"] = torch.zeros(RANK, 3)
    sd["something_else.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        lf.to_comfy_for_model(sd, flux, source="eligen.safetensors")
    message = str(error.value)
    assert "eligen.safetensors" in message and "3 key(s)" in message
    assert "lora_unet_double_blocks_0_img_attn_nonexistent.lora_up.weight" in message
    assert "something_else.weight" in message
    assert "img_attn_qkv" not in message


def test_qwen_lora_on_flux_is_rejected(flux, qwen):
    sd = peft_file(qwen, qwen_targets(qwen)[:24])
    with pytest.raises(ValueError, match="transformer_blocks.0.attn.to_q.lora_B.default.weight"):
        lf.to_comfy_for_model(sd, flux)


def test_shape_that_does_not_fit_is_named(flux):
    sd = kohya_file(flux, ["double_blocks.0.img_attn.proj"])
    sd["lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"] = torch.zeros(RANK, 100)
    with pytest.raises(ValueError, match=r"double_blocks\.0\.img_attn\.proj\.lora_down\.weight.*\(3072, 3072\)"):
        lf.to_comfy_for_model(sd, flux)


def test_export_kohya_for_flux_keeps_the_weight_change(flux):
    module = "double_blocks.5.txt_attn.proj"
    up, down = lora_pair(flux, module, 7)
    comfy_sd = {f"diffusion_model.{module}.lora_up.weight": up, f"diffusion_model.{module}.lora_down.weight": down,
                f"diffusion_model.{module}.alpha": torch.tensor(0.5)}
    kohya = lf.to_reference(comfy_sd, "kohya")
    assert sorted(kohya) == ["lora_unet_double_blocks_5_txt_attn_proj.alpha", "lora_unet_double_blocks_5_txt_attn_proj.lora_down.weight",
                             "lora_unet_double_blocks_5_txt_attn_proj.lora_up.weight"]
    weight = f"diffusion_model.{module}.weight"
    shape = flux.state_dict()[weight].shape
    expected = stock_delta(stock_patches(comfy_sd, flux)[weight], shape)
    assert torch.allclose(stock_delta(stock_patches(kohya, flux)[weight], shape), expected)
    assert torch.allclose(expected, up @ down * 0.5 / RANK, atol=1e-5)


def test_export_peft_for_qwen_folds_alpha_into_lora_b(qwen):
    module = "transformer_blocks.2.attn.add_k_proj"
    up, down = lora_pair(qwen, module, 3)
    comfy_sd = {f"diffusion_model.{module}.lora_up.weight": up, f"diffusion_model.{module}.lora_down.weight": down,
                f"diffusion_model.{module}.alpha": torch.tensor(8.0)}
    peft = lf.to_reference(comfy_sd, "peft")
    assert sorted(peft) == [f"{module}.lora_A.default.weight", f"{module}.lora_B.default.weight"]
    assert lf.detect_format(peft) == "peft"
    weight = f"diffusion_model.{module}.weight"
    shape = qwen.state_dict()[weight].shape
    assert torch.allclose(stock_delta(stock_patches(peft, qwen)[weight], shape),
                          stock_delta(stock_patches(comfy_sd, qwen)[weight], shape), atol=1e-5)
    # And back: the peft file converts to ComfyUI form with the same change.
    back = lf.to_comfy_for_model(peft, qwen)
    assert torch.allclose(stock_delta(stock_patches(back, qwen)[weight], shape), up @ down * 8.0 / RANK, atol=1e-4)


def test_to_reference_refuses_other_forms():
    with pytest.raises(ValueError, match="lora_unet_x.lora_up.weight"):
        lf.to_reference({"lora_unet_x.lora_up.weight": torch.zeros(1, 1)}, "kohya")
    with pytest.raises(ValueError, match="has no lora_up"):
        lf.to_reference({"diffusion_model.x.lora_down.weight": torch.zeros(1, 1)}, "peft")
    with pytest.raises(ValueError, match="diffusers"):
        lf.to_reference({}, "diffusers")


def test_detect_format():
    assert lf.detect_format({"diffusion_model.a.lora_up.weight": torch.zeros(1)}) == "comfy"
    assert lf.detect_format({"x.y.lora_A.weight": torch.zeros(1)}) == "peft"
    assert lf.detect_format({"single_blocks.1.proj_out.lora_B.weight": torch.zeros(1)}) == "diffsynth_flux"
    assert lf.detect_format({"x.weight": torch.zeros(1)}) == "unknown"
    assert lf.detect_format({"x.y.lora_A.weight": torch.zeros(1), "lora_unet_a.alpha": torch.zeros(())}) == "mixed"
    with pytest.raises(ValueError, match="no tensors"):
        lf.detect_format({})


def test_save_is_atomic_and_keeps_metadata(tmp_path):
    path = tmp_path / "loras" / "eligen_test.safetensors"
    sd = {"diffusion_model.a.lora_up.weight": torch.randn(4, 2, dtype=torch.bfloat16),
          "diffusion_model.a.lora_down.weight": torch.randn(2, 3, dtype=torch.bfloat16),
          "diffusion_model.a.alpha": torch.tensor(2.0)}
    settings = {"rank": 2, "alpha": 2.0, "preset": "eligen", "lr": 1e-4}
    lf.save_lora(str(path), sd, {"eligen_training": settings, "note": "plain text"})
    assert os.listdir(path.parent) == ["eligen_test.safetensors"]
    loaded = lf.load_lora(str(path))
    assert sorted(loaded) == sorted(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    metadata = lf.load_lora_metadata(str(path))
    assert metadata["eligen_training"] == settings and metadata["note"] == "plain text"

    # A failed write leaves the old file as it was and no temp file behind.
    before = path.read_bytes()
    with pytest.raises(ValueError, match="'diffusion_model.a.lora_up.weight' holds a str"):
        lf.save_lora(str(path), {"diffusion_model.a.lora_up.weight": "not a tensor"}, {})
    blocked = path.parent / "blocked.safetensors"
    blocked.mkdir()  # os.replace onto a folder fails after the temp file was written
    with pytest.raises(OSError):
        lf.save_lora(str(blocked), sd, {})
    blocked.rmdir()
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["eligen_test.safetensors"]
    with pytest.raises(ValueError, match="'bad' cannot be written as JSON"):
        lf.save_lora(str(path), sd, {"bad": object()})
    assert os.listdir(path.parent) == ["eligen_test.safetensors"]


def test_only_safetensors_are_loaded(tmp_path):
    pickle_file = tmp_path / "eligen.ckpt"
    pickle_file.write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match=r"'eligen\.ckpt' is not a \.safetensors file"):
        lf.load_lora(str(pickle_file))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(json.dumps({"x": 1}).encode())
    with pytest.raises(ValueError, match=r"'broken\.safetensors' is not a valid safetensors file"):
        lf.load_lora(str(broken))
    with pytest.raises(ValueError, match="does not exist"):
        lf.load_lora(str(tmp_path / "missing.safetensors"))
