"""The toy world's random models (toyworld.models.load_toy_models(weights="random")) with one block of
each kind, for tests that train many short runs in several processes (tests/server/test_distributed.py).

Same families, widths, heads, text encoder, VAE and weight init; only the repeated blocks are fewer, so a
step does less work and FSDP gathers fewer layers. The block code, the LoRA targets and every kind of
sharded layer stay the same as in the full toy.
"""

import torch

from comfyui_eligen.core import host
from comfyui_eligen.toyworld import models

ONE_BLOCK_EACH = {"flux": {"depth": 1, "depth_single_blocks": 1}, "qwen_image": {"num_layers": 1}}


def load_shallow_toy_models(family="flux", weights="random", seed=0, dtype=torch.float32):
    """(ModelPatcher, CLIP, VAE) as the EliGen Toy Model Loader gives with random weights, with
    ONE_BLOCK_EACH; the loader's inputs (family, weights, seed) as in a run file."""
    if weights != "random":
        raise ValueError(f"shallow toy models have no {weights!r} weights: use weights='random'")
    spec = models.family_spec(family)
    config = host.models.supported_model_config(spec["model_class"])({**spec["unet_config"], **ONE_BLOCK_EACH[family]})
    config.set_inference_dtype(dtype, None)
    base_model = config.get_model({})
    models.init_weights(base_model.diffusion_model, seed)
    return models.wrap_model(base_model), models.build_clip(seed), models.ToyVAE(family)
