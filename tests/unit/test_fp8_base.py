"""fp8 bases under the peft LoRA: ComfyUI's ``fp8_e4m3fn`` / ``fp8_e5m2`` weight dtypes and "scaled fp8"
checkpoints (fp8 weights with a per-tensor ``scale_weight``), loaded the way the stock loader does
(``comfy.sd.load_diffusion_model_state_dict``: model config with ``scaled_fp8`` and the inference/manual-cast
dtypes, ``get_model``, ``load_model_weights``; the tiny configs are given, not detected), compute in bf16 as
on a GPU.

The claim: LoRA gradients on an fp8 base equal those on the same weights dequantised to bf16.
- plain fp8: fp8 -> bf16 is exact (fewer mantissa bits, narrower exponent range), and ComfyUI's manual cast
  then computes exactly what the bf16 model computes: the gradients must be bit-identical.
- scaled fp8: ComfyUI rounds the scale to bf16 and multiplies either the weight or the input by it, where the
  dequantised model holds round_bf16(w * scale): each weight then differs by at most 3 bf16 roundings
  (u = 2^-8 each). The tolerance is what that size of weight change does to the gradients, measured on the
  dequantised model itself: every weight perturbed by a relative 3u with random sign (the shape of rounding
  errors), the largest gradient change over a few draws.
"""

import pytest
import torch

import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
from comfyui_eligen.training import lora
from comfyui_eligen.training.model import TrainingModel
from comfyui_eligen.training.settings import TrainSettings

from test_offload import one_loss

from test_training_loop import samples_for
from tiny_models import tiny_flux, tiny_qwen_image

LORA = lora.LoraSettings(rank=4, alpha=4, preset="eligen")
BF16_ROUNDING = 2.0 ** -8
FAMILIES = {"flux": (tiny_flux, comfy.supported_models.Flux), "qwen_image": (tiny_qwen_image, comfy.supported_models.QwenImage)}


def load_like_stock(family, sd, weight_dtype, scaled_fp8=None):
    """What ``load_diffusion_model_state_dict`` does once it knows the config (a GPU's choices: bf16 compute)."""
    make, config_class = FAMILIES[family]
    config = config_class(dict(make().model.model_config.unet_config))
    config.scaled_fp8 = scaled_fp8
    manual_cast = torch.bfloat16 if weight_dtype not in (torch.bfloat16, torch.float32) else None
    config.set_inference_dtype(weight_dtype, manual_cast)
    model = config.get_model(sd, "")
    model.load_model_weights(dict(sd), "")
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def reference_weights(family):
    return {k: v.detach().clone() for k, v in FAMILIES[family][0](seed=2).model.diffusion_model.state_dict().items()}


def quantise(sd, dtype, scaled):
    """fp8 checkpoint: every matrix in ``dtype`` (per-tensor ``scale_weight`` when scaled) + its bf16 twin."""
    fp8, dequantised = {}, {}
    for key, value in sd.items():
        if key.endswith(".weight") and value.ndim == 2 and scaled:
            scale = (value.abs().amax().float() / torch.finfo(dtype).max).reshape(())
            fp8[key] = (value.float() / scale).to(dtype)
            fp8[key[: -len("weight")] + "scale_weight"] = scale
            dequantised[key] = (fp8[key].float() * scale).to(torch.bfloat16)
        elif scaled:
            fp8[key] = value.to(torch.bfloat16)
            dequantised[key] = fp8[key]
        else:
            fp8[key] = value.to(dtype)
            dequantised[key] = fp8[key].to(torch.bfloat16)
    return fp8, dequantised


def lora_gradients(model_patcher, samples):
    with torch.inference_mode(False), TrainingModel(model_patcher, LORA, seed=0) as model:
        # B starts at zero: put a fixed non-zero B in, so the gradients reach through the whole network
        with torch.no_grad():
            for i, param in enumerate(model.parameters):
                if i % 2:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
        one_loss(model, samples).backward()
        return torch.cat([p.grad.flatten().float() for p in model.parameters if p.grad is not None])


def perturbed(sd, relative, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in sd.items():
        if value.ndim == 2:
            sign = torch.randint(0, 2, value.shape, generator=g).float() * 2 - 1
            out[key] = (value.float() * (1 + relative * sign)).to(value.dtype)
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("family", ["flux", "qwen_image"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_base_gradients_equal_the_dequantised_base(family, dtype):
    samples = samples_for(family)
    fp8, dequantised = quantise(reference_weights(family), dtype, scaled=False)
    base = load_like_stock(family, fp8, dtype)
    assert base.model.diffusion_model.img_in.weight.dtype == dtype and base.model.manual_cast_dtype == torch.bfloat16
    on_fp8 = lora_gradients(base, samples)
    on_bf16 = lora_gradients(load_like_stock(family, dequantised, torch.bfloat16), samples)
    assert on_fp8.abs().max() > 0 and torch.isfinite(on_fp8).all()
    assert torch.equal(on_fp8, on_bf16)


@pytest.mark.parametrize("family", ["flux", "qwen_image"])
def test_scaled_fp8_base_gradients_agree_within_bf16_rounding(family):
    samples = samples_for(family)
    fp8, dequantised = quantise(reference_weights(family), torch.float8_e4m3fn, scaled=True)
    base = load_like_stock(family, fp8, torch.bfloat16, scaled_fp8=torch.float8_e4m3fn)
    layer = base.model.diffusion_model.img_in
    assert layer.weight.dtype == torch.float8_e4m3fn and float(layer.scale_weight) != 1.0
    on_fp8 = lora_gradients(base, samples)
    on_bf16 = lora_gradients(load_like_stock(family, dequantised, torch.bfloat16), samples)
    tolerance = max(
        (lora_gradients(load_like_stock(family, perturbed(dequantised, 3 * BF16_ROUNDING, seed), torch.bfloat16),
                        samples) - on_bf16).norm()
        for seed in range(3)
    )
    difference = (on_fp8 - on_bf16).norm()
    print(f"{family}: |g_fp8 - g_bf16| = {difference:.3e}, tolerance {tolerance:.3e}, |g| = {on_bf16.norm():.3e}")
    assert 0 < tolerance < 0.2 * on_bf16.norm()  # the tolerance itself is a small change
    assert difference <= tolerance


@pytest.mark.parametrize("family", ["flux", "qwen_image"])
def test_block_swap_on_an_fp8_base_is_bit_identical(family):
    """Swapped blocks move their fp8 weights and scales as they are; ComfyUI's manual cast runs on the device."""
    from comfyui_eligen.training.loop import TrainingData, train

    fp8, _ = quantise(reference_weights(family), torch.float8_e4m3fn, scaled=True)
    base = load_like_stock(family, fp8, torch.bfloat16, scaled_fp8=torch.float8_e4m3fn)
    samples = samples_for(family)
    settings = dict(steps=2, learning_rate=1e-2, gradient_checkpointing=False, seed=1)
    plain = train(base, TrainingData(samples), LORA, TrainSettings(**settings))
    swapped = train(base, TrainingData(samples), LORA, TrainSettings(blocks_to_swap=1, **settings))
    assert [l for _, l in swapped.losses] == [l for _, l in plain.losses]
    assert all(torch.equal(swapped.lora[k], plain.lora[k]) for k in plain.lora)
