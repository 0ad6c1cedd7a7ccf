"""The family adapter's interface and what FLUX.1 and Qwen-Image share (core/adapters/__init__.py)."""

import torch

from .. import host
from ..attention import mask_to_token_grid


class Adapter:
    family = ""            # short id: "flux", "qwen_image"
    display_name = ""      # for messages: "FLUX.1", "Qwen-Image"
    patch_size = 2
    latent_scale = 8            # image pixels per latent cell along each side (the family's VAE)
    reference_schedule = {}     # the reference's training sigma schedule (training/loss.py reference_sigmas)
    base_model_class = ""       # host.models.MODEL_CLASSES names of the family's BaseModel and diffusion model
    diffusion_model_class = ""
    LORA_TARGETS = {}      # preset name -> module-name regexes (full match, ComfyUI names)
    lora_reference_format = ""
    training_blocks = {}   # see core/blocks.py

    # -- where the diffusion model's forward puts arguments when it calls its DIFFUSION_MODEL wrappers
    @property
    def CONTEXT_INDEX(self):
        return host.models.forward_argument_index(host.models.model_class(self.diffusion_model_class), "context")

    @property
    def REF_LATENTS_INDEX(self):
        return host.models.forward_argument_index(host.models.model_class(self.diffusion_model_class), "ref_latents")

    @property
    def ATTENTION_MASK_INDEX(self):
        """None where ``attention_mask`` travels as a keyword argument (FLUX.1)."""
        return host.models.forward_argument_index(host.models.model_class(self.diffusion_model_class), "attention_mask")

    @property
    def TRANSFORMER_OPTIONS_INDEX(self):
        return host.models.forward_argument_index(host.models.model_class(self.diffusion_model_class), "transformer_options")

    # -- recognising the family -------------------------------------------------------------
    def matches_base_model(self, base_model):
        # Exact class: subclasses (FLUX.2, Chroma under model_base.Flux) are different models.
        return (type(base_model) is host.models.model_class(self.base_model_class)
                and self.matches_diffusion_model(base_model.diffusion_model))

    def matches_diffusion_model(self, diffusion_model):
        return type(diffusion_model) is host.models.model_class(self.diffusion_model_class)

    # -- shapes -----------------------------------------------------------------------------
    def context_dim(self, diffusion_model):
        """Width of the text embeddings the model takes (T5 4096 for FLUX.1, Qwen2.5-VL 3584)."""
        return host.models.context_width(diffusion_model)

    def image_token_masks(self, masks, x, ref_latents=None, mask_sizes=None):
        """Entity masks ``[B, N, H, W]`` -> bool ``[B, N, T_img]`` in the model's image-token order:
        the latent's grid, then one grid per reference latent (the reference tiles the mask over them).
        ``mask_sizes``: each mask's own size when they are stored padded (see EntityCondition)."""
        sizes = [tuple(x.shape[-2:])] + [tuple(ref.shape[-2:]) for ref in (ref_latents or [])]
        grids = [mask_to_token_grid(masks, size, self.patch_size, mask_sizes).flatten(-2) for size in sizes]
        return torch.cat(grids, dim=-1)

    # -- text positions ---------------------------------------------------------------------
    def text_position_options(self, diffusion_model, transformer_options, rows, text_length):
        """transformer_options that give every text segment the positions the reference gives it.
        ``rows``: the text layout ``(L1 .. LN, LG)`` of every batch row, or one for all (a tuple of one);
        text positions from a row's own text up to ``text_length`` are padding (never seen).
        Default: nothing to do (all text positions are equal)."""
        return transformer_options

    # -- training ---------------------------------------------------------------------------
    def forward_kwargs(self, diffusion_model, pooled, batch, guidance=1.0):
        """Family-specific keyword arguments of ``diffusion_model.forward`` besides x, t, context.
        ``guidance``: the embedded guidance of guidance-distilled models (ignored by the others)."""
        return {}

    def training_forward(self, base_model, x_t, sigma, context, pooled, entity_condition, transformer_options,
                         guidance=1.0):
        """Velocity prediction through ``diffusion_model.forward`` (so the EliGen wrapper and attention
        override in ``transformer_options["wrappers"]`` apply as in sampling). ``sigma`` is ``[B]``."""
        diffusion_model = base_model.diffusion_model
        timestep = host.models.timestep(base_model, sigma).float()
        kwargs = self.forward_kwargs(diffusion_model, pooled, x_t.shape[0], guidance)
        if entity_condition is not None:
            kwargs["eligen"] = entity_condition
        return diffusion_model(x_t, timestep, context, transformer_options=transformer_options, **kwargs)
