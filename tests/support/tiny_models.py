"""Tiny FLUX.1 and Qwen-Image models for plain-function tests (CPU, milliseconds per step).

Built the stock way, through ``comfy.supported_models`` and wrapped in a ModelPatcher, with every weight
initialised explicitly from a seed (comfy.ops layers skip their own init). Nothing is zero, so every
layer - and the entity mask - affects the output.
"""

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
from comfyui_eligen.core import conditioning

TEXT_WIDTH = 32


def _init(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                value = torch.randn(param.shape, generator=generator) / param[0].numel() ** 0.5
            elif name.endswith("scale") or "norm" in name:
                value = torch.ones(param.shape)
            else:
                value = 0.02 * torch.randn(param.shape, generator=generator)
            param.copy_(value.to(param.dtype))


def _patcher(config_class, unet_config, seed, dtype):
    config = config_class(unet_config)
    config.set_inference_dtype(dtype, None)
    base_model = config.get_model({})
    _init(base_model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(
        base_model, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device())


def tiny_flux(seed=0, hidden=64, heads=2, depth=1, single_depth=1, text_width=TEXT_WIDTH,
              guidance_embed=False, dtype=torch.float32):
    """A FLUX.1 ModelPatcher: 16 latent channels, patch 2, text width ``text_width``."""
    head_dim = hidden // heads
    axes = [head_dim - 2 * (head_dim * 3 // 8), head_dim * 3 // 8, head_dim * 3 // 8]
    axes = [a - a % 2 for a in axes]
    axes[0] += head_dim - sum(axes)
    unet_config = {
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": text_width,
        "context_in_dim": text_width, "hidden_size": hidden, "mlp_ratio": 2.0, "num_heads": heads,
        "depth": depth, "depth_single_blocks": single_depth, "axes_dim": axes, "theta": 10000,
        "patch_size": 2, "qkv_bias": True, "guidance_embed": guidance_embed,
    }
    return _patcher(comfy.supported_models.Flux, unet_config, seed, dtype)


def tiny_qwen_image(seed=0, heads=2, head_dim=32, layers=2, text_width=TEXT_WIDTH, dtype=torch.float32):
    """A Qwen-Image ModelPatcher: 16 latent channels, patch 2, text width ``text_width``."""
    axes = [head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8]
    unet_config = {
        "image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16,
        "num_layers": layers, "attention_head_dim": head_dim, "num_attention_heads": heads,
        "joint_attention_dim": text_width, "axes_dims_rope": axes,
    }
    return _patcher(comfy.supported_models.QwenImage, unet_config, seed, dtype)


TINY_MODELS = {"flux": tiny_flux, "qwen_image": tiny_qwen_image}


def prompts(seed=0, global_length=6, negative_length=4):
    """Random positive and negative CONDITIONING (FLUX-shaped: text and pooled) at the tiny text width."""
    generator = torch.Generator().manual_seed(seed)
    positive = [[torch.randn(1, global_length, TEXT_WIDTH, generator=generator),
                 {"pooled_output": torch.randn(1, TEXT_WIDTH, generator=generator)}]]
    negative = [[torch.randn(1, negative_length, TEXT_WIDTH, generator=generator),
                 {"pooled_output": torch.randn(1, TEXT_WIDTH, generator=generator)}]]
    return positive, negative


def entities(count=2, mask_hw=(64, 96), lengths=(3, 5), seed=1):
    """``count`` entities with random prompts and overlapping rectangles on the diagonal."""
    generator = torch.Generator().manual_seed(seed)
    out = ()
    for i in range(count):
        mask = torch.zeros(mask_hw)
        h, w = mask_hw
        mask[i * h // (2 * count): h // 2 + i * h // (2 * count), i * w // (2 * count): w // 2 + i * w // (2 * count)] = 1
        out = conditioning.add_entity(out, conditioning.Entity(
            torch.randn(1, lengths[i % len(lengths)], TEXT_WIDTH, generator=generator), mask, f"thing {i}"))
    return out
