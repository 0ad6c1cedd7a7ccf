"""Model-family adapters: everything that differs between FLUX.1 and Qwen-Image lives here.

``adapter_for(model)`` takes a ModelPatcher, a ``comfy.model_base.BaseModel`` or a diffusion model and
returns the family's adapter, or raises a ValueError naming the class it got. Code outside this package
asks the adapter instead of testing the family itself. ``base.Adapter`` is the interface; each family
is a module.
"""

from .. import host
from .flux import FluxAdapter
from .qwen_image import QwenImageAdapter


def adapter_for(model):
    """The adapter of a ModelPatcher, BaseModel or diffusion model; ValueError for other families."""
    model = host.models.unwrap_patcher(model)
    adapters = (FluxAdapter(), QwenImageAdapter())
    if host.models.is_base_model(model):
        found = [a for a in adapters if a.matches_base_model(model)]
    else:
        found = [a for a in adapters if a.matches_diffusion_model(model)]
    if not found:
        raise ValueError(f"EliGen supports FLUX.1 and Qwen-Image; this model is {type(model).__name__}")
    return found[0]
