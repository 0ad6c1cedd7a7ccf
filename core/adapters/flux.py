"""FLUX.1 (dev, schnell, Kontext): ComfyUI's ``comfy.ldm.flux.model.Flux`` with 3 RoPE axes.

Text positions are all zero in FLUX.1, so entity segments need no position change: only the attention
mask. FLUX.2 (4 axes, global modulation) and Chroma are other families.
"""

import torch

from .. import host
from ..blocks import FLUX_TRAINING_BLOCKS
from .base import Adapter

_DOUBLE = r"double_blocks\.\d+\."
_SINGLE = r"single_blocks\.\d+\."


class FluxAdapter(Adapter):
    family = "flux"
    display_name = "FLUX.1"
    reference_schedule = {"kind": "linear", "shift": 3.0, "sigma_min": 0.003 / 1.002}
    base_model_class = "Flux model"
    diffusion_model_class = "Flux diffusion model"
    LORA_TARGETS = {
        # The reference's EliGen targets (eligen.md), in ComfyUI module names.
        "eligen": [
            _DOUBLE + r"(img_attn\.qkv|txt_attn\.qkv|img_attn\.proj|txt_attn\.proj|img_mlp\.[02]|txt_mlp\.[02]|img_mod\.lin|txt_mod\.lin)",
            _SINGLE + r"(linear1|linear2|modulation\.lin)",
        ],
        # Every block linear except the modulation (the toy-world recipe).
        "no_modulation": [
            _DOUBLE + r"(img_attn\.qkv|txt_attn\.qkv|img_attn\.proj|txt_attn\.proj|img_mlp\.[02]|txt_mlp\.[02])",
            _SINGLE + r"(linear1|linear2)",
        ],
        "attention": [
            _DOUBLE + r"(img_attn\.qkv|txt_attn\.qkv|img_attn\.proj|txt_attn\.proj)",
            _SINGLE + r"(linear1|linear2)",
        ],
    }
    lora_reference_format = "kohya"
    training_blocks = FLUX_TRAINING_BLOCKS

    def matches_diffusion_model(self, diffusion_model):
        return super().matches_diffusion_model(diffusion_model) and host.models.flux1_params(diffusion_model)

    def forward_kwargs(self, diffusion_model, pooled, batch, guidance=1.0):
        kwargs = {"y": pooled}
        if host.models.flux_guidance_embedded(diffusion_model):
            # The reference trains FLUX.1-dev with embedded guidance 1 (inference uses ~3.5).
            kwargs["guidance"] = torch.full((batch,), float(guidance),
                                            device=pooled.device if pooled is not None else None)
        return kwargs
