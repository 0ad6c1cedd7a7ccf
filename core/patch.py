"""The model side of EliGen: one DIFFUSION_MODEL wrapper on a clone of the MODEL.

For every forward pass that carries an ``eligen`` keyword argument (from ``model_conds``, see
core/conditioning.py) the wrapper
1. drops the entity tokens when the step lies outside the entity's [start, end] range;
2. otherwise builds the token-grid mask at the real latent size and puts it, with an attention override
   that applies it, into a fresh copy of ``transformer_options``; an override already there (from another
   node, installed before or after this one) is chained, not replaced;
3. lets the family adapter adjust text positions (Qwen-Image: per-segment RoPE through ``("double_block",
   i)`` replacements that wrap any replacement already there).
Everything is installed per call, so patches that other nodes add after EliGen Apply compose too.
Forward passes without ``eligen`` (plain prompts, the negative by default) run unchanged.
"""

import logging

import torch

from . import host
from .adapters import adapter_for
from .attention import AUTO, METHODS, OPTIONS_KEY, EntityAttention, entity_attention_override
from .conditioning import describe
from .mask_rule import aspect_problem

WRAPPER_KEY = "eligen"


def patch_model(model_patcher, attention=AUTO):
    """A clone of ``model_patcher`` with the EliGen wrapper (idempotent: patching twice adds nothing).

    attention: how the entity rule reaches attention, all with the same result (core/attention.py):
    ``"auto"`` (the default: ``"augmented"`` where it is safe, else ``"grouped"``), ``"augmented"`` (one
    unmasked call, the rule in extra head dimensions), ``"grouped"`` (unmasked calls on gathered pieces),
    ``"dense"`` (one call with the additive S x S mask: the reference form, a fallback and for tests)."""
    if attention not in METHODS:
        raise ValueError(f"attention must be one of {', '.join(METHODS)}, not {attention!r}")
    host.require_all()
    adapter = adapter_for(model_patcher)
    model = model_patcher.clone()
    wrappers = host.models.diffusion_model_wrappers(model, WRAPPER_KEY)
    if not wrappers:
        host.models.add_diffusion_model_wrapper(model, WRAPPER_KEY, EntityWrapper(adapter, model_patcher.model, attention))
    elif wrappers[0].method != attention:
        raise ValueError(f"the model is already patched for EliGen with attention={wrappers[0].method!r}; "
                         f"patch the unpatched model to use attention={attention!r}")
    return model


def is_active(entity, base_model, transformer_options):
    """Whether this step lies in the entity's range (ComfyUI's start/end_percent meaning, as on the
    ControlNet and timestep-range nodes). Outside sampling (no sigma known) it is always active."""
    if entity.start <= 0.0 and entity.end >= 1.0:
        return True
    sigmas = transformer_options.get("sigmas")
    if sigmas is None or base_model is None:
        return True
    sigma = float(sigmas.max())
    return (host.models.percent_to_sigma(base_model, entity.end) <= sigma
            <= host.models.percent_to_sigma(base_model, entity.start))


def check_mask_aspect(entity, latent_hw, latent_scale=None):
    """Every mask must fit the latent's aspect (core/mask_rule.py); a ValueError names the entities and,
    with ``latent_scale`` (image pixels per latent cell), the image size in pixels. It is raised while
    sampling, so the message itself says it comes from the entities given to EliGen Apply."""
    labels = entity.labels or ("?",) * len(entity.sizes())
    problems = {}
    for index, (size, label) in enumerate(zip(entity.sizes(), labels)):
        problem = aspect_problem(size, latent_hw, scale=latent_scale)
        if problem:
            problems.setdefault(problem, []).append(describe(index, label))
    if problems:
        raise ValueError("EliGen Apply: the entity masks do not fit the image being sampled: "
                         + "; ".join(f"{', '.join(who)}: {problem}" for problem, who in problems.items())
                         + "; draw the masks at the image's aspect ratio, or sample an image (latent size) of "
                           "the masks' aspect")


class EntityWrapper:
    """The DIFFUSION_MODEL wrapper (a class so ComfyUI can deep-copy model options holding it)."""

    def __init__(self, adapter, base_model, method=AUTO):
        self.adapter = adapter
        self.base_model = base_model
        self.method = method
        self._cache = None  # (key, EntityAttention): the mask is the same at every step of a run

    def __deepcopy__(self, memo):
        return self

    def attention_for(self, entity, x, ref_latents):
        token_masks = self.adapter.image_token_masks(entity.masks.to(x.device), x, ref_latents, entity.mask_sizes)
        if bool((token_masks == token_masks[:1]).all()):
            token_masks = token_masks[:1]  # one mask for the whole batch (broadcast in attention)
        # Inference-mode tensors cannot enter autograd: validation sampling and training keep separate masks.
        key = (entity.segment_lengths, token_masks.shape, str(x.device), torch.is_inference_mode_enabled())
        if self._cache is not None and self._cache[0][0] == key and self._cache[0][1].equal(token_masks):
            return self._cache[1]
        if not bool(token_masks.any(-1).all()):
            logging.warning("EliGen: an entity mask covers no image token at latent size %s; that "
                            "entity's text reaches no part of the image", tuple(x.shape[-2:]))
        attention = EntityAttention(entity.segment_lengths, token_masks, self.method)
        self._cache = ((key, token_masks), attention)
        return attention

    def __call__(self, executor, *args, **kwargs):
        entity = kwargs.pop("eligen", None)
        if entity is None:
            return executor(*args, **kwargs)
        adapter = self.adapter
        args = list(args)
        index = adapter.TRANSFORMER_OPTIONS_INDEX
        options = args[index] if len(args) > index else kwargs.get("transformer_options", {})
        x, context = args[0], args[adapter.CONTEXT_INDEX]
        if context.shape[1] != sum(entity.segment_lengths):
            raise ValueError(
                f"EliGen: the prompt has {context.shape[1]} text tokens but the entities were applied to "
                f"{sum(entity.segment_lengths)}; apply EliGen after any node that changes the conditioning")
        check_mask_aspect(entity, tuple(x.shape[-2:]), adapter.latent_scale)

        if not is_active(entity, self.base_model, options):
            # Plain prompt for this step: the global segment only (another node's joint mask shrinks too).
            drop = entity.entity_tokens
            args[adapter.CONTEXT_INDEX] = context[:, drop:]
            mask = kwargs.get("attention_mask")
            if mask is not None and mask.ndim == 3:
                kwargs["attention_mask"] = mask[:, drop:, drop:]
            return executor(*args, **kwargs)

        ref_latents = args[adapter.REF_LATENTS_INDEX] if len(args) > adapter.REF_LATENTS_INDEX else None
        attention = self.attention_for(entity, x, ref_latents)
        options = host.attention.with_attention_override(options, entity_attention_override)
        options[OPTIONS_KEY] = attention
        options = adapter.text_position_options(host.models.wrapped_diffusion_model(executor), options,
                                                entity.segment_lengths)
        if len(args) > index:
            args[index] = options
        else:
            kwargs["transformer_options"] = options
        return executor(*args, **kwargs)
