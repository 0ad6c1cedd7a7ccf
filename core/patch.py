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
from .attention import AUTO, METHODS, OPTIONS_KEY, EntityAttention, entity_attention_override, layout_rows
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


def joint_text_length(rows, context_length):
    """How many text tokens the entity layouts ``rows`` (one per batch row) use of a context of
    ``context_length``: the longest row's. With one layout the context must be exactly it; with several
    (conditionings batched together) a shorter row may have been repeated to the common length
    (ComfyUI's cross-attention concat) or padded (training): what follows a row's own text is padding."""
    totals = [sum(row) for row in rows]
    longest = max(totals)
    several = len(set(rows)) > 1
    if context_length == longest or several and all(t and context_length % t == 0 for t in totals):
        return longest
    applied = f"{longest}" if not several else f"prompts of {', '.join(map(str, sorted(set(totals))))}"
    raise ValueError(f"EliGen: the prompt has {context_length} text tokens but the entities were applied to "
                     f"{applied}; apply EliGen after any node that changes the conditioning")


class _Arguments:
    """The wrapper's positional and keyword arguments, read and replaced by parameter name."""

    def __init__(self, adapter, args, kwargs):
        self.args, self.kwargs = list(args), kwargs
        self.positions = {"context": adapter.CONTEXT_INDEX, "ref_latents": adapter.REF_LATENTS_INDEX,
                          "transformer_options": adapter.TRANSFORMER_OPTIONS_INDEX,
                          "attention_mask": adapter.ATTENTION_MASK_INDEX}

    def get(self, name, default=None):
        index = self.positions[name]
        if index is not None and index < len(self.args):
            return self.args[index]
        return self.kwargs.get(name, default)

    def set(self, name, value):
        index = self.positions[name]
        if index is not None and index < len(self.args):
            self.args[index] = value
        else:
            self.kwargs[name] = value

    def select_text(self, index):
        """Keep the text tokens ``index`` (``[T']`` for every row or ``[B, T']`` per row) of the context and
        of another node's attention mask (text ``[B, L]`` or joint ``[B, S, S]``); the image stays."""
        context = self.get("context")
        length = context.shape[1]
        per_row = index.ndim == 2
        rows = index if per_row else index[None].expand(context.shape[0], -1)
        self.set("context", torch.gather(context, 1, rows[..., None].expand(-1, -1, context.shape[-1])))
        mask = self.get("attention_mask")
        if mask is None or mask.ndim not in (2, 3):
            return
        image = torch.arange(length, mask.shape[-1], device=mask.device)
        keep = torch.cat([rows.to(mask.device), image[None].expand(rows.shape[0], -1)], 1)
        mask = mask.expand(keep.shape[0], *mask.shape[1:])  # a mask shared by the batch: one per row now
        mask = torch.gather(mask, -1, keep[:, None].expand(-1, mask.shape[-2], -1) if mask.ndim == 3 else keep)
        if mask.ndim == 3:
            mask = torch.gather(mask, 1, keep[..., None].expand(-1, -1, mask.shape[-1]))
        self.set("attention_mask", mask)


def keep_global_prompts(rows, arguments):
    """Outside the entities' step range: each row keeps only its global prompt (entity tokens dropped).
    Returns the rows' new layouts ``((LG,), ..)``; rows whose prompts differ in length are padded."""
    starts = [sum(row[:-1]) for row in rows]
    lengths = [row[-1] for row in rows]
    device = arguments.get("context").device
    longest = max(lengths)
    index = torch.stack([torch.arange(longest, device=device).clamp(max=n - 1) + start
                         for start, n in zip(starts, lengths)])
    arguments.select_text(index[0] if len(set(zip(starts, lengths))) == 1 else index)
    return tuple((n,) for n in lengths)


class EntityWrapper:
    """The DIFFUSION_MODEL wrapper (a class so ComfyUI can deep-copy model options holding it)."""

    def __init__(self, adapter, base_model, method=AUTO):
        self.adapter = adapter
        self.base_model = base_model
        self.method = method
        self._cache = None  # (key, EntityAttention): the mask is the same at every step of a run

    def __deepcopy__(self, memo):
        return self

    def attention_for(self, rows, masks, mask_sizes, x, ref_latents, text_length):
        token_masks = self.adapter.image_token_masks(masks.to(x.device), x, ref_latents, mask_sizes)
        if bool((token_masks == token_masks[:1]).all()):
            token_masks = token_masks[:1]  # one mask for the whole batch (broadcast in attention)
        rows = layout_rows(rows)
        # Inference-mode tensors cannot enter autograd: validation sampling and training keep separate masks.
        key = (rows, text_length, token_masks.shape, str(x.device), torch.is_inference_mode_enabled())
        if self._cache is not None and self._cache[0][0] == key and self._cache[0][1].equal(token_masks):
            return self._cache[1]
        real = torch.tensor([[n > 0 for n in row[:-1]] for row in rows], dtype=torch.bool, device=x.device)
        if bool((real & ~token_masks.any(-1)).any()):
            logging.warning("EliGen: an entity mask covers no image token at latent size %s; that "
                            "entity's text reaches no part of the image", tuple(x.shape[-2:]))
        attention = EntityAttention(rows, token_masks, self.method, text_length)
        self._cache = ((key, token_masks), attention)
        return attention

    def __call__(self, executor, *args, **kwargs):
        entity = kwargs.pop("eligen", None)
        if entity is None:
            return executor(*args, **kwargs)
        adapter = self.adapter
        arguments = _Arguments(adapter, args, kwargs)
        x, context = args[0], arguments.get("context")
        rows = entity.rows_for(x.shape[0])
        text_length = joint_text_length(rows, context.shape[1])
        if text_length < context.shape[1]:  # ComfyUI repeated shorter rows past the longest one
            arguments.select_text(torch.arange(text_length, device=context.device))
        check_mask_aspect(entity, tuple(x.shape[-2:]), adapter.latent_scale)

        masks = entity.masks
        if not is_active(entity, self.base_model, arguments.get("transformer_options", {})):
            # Plain prompts for this step: each row's global segment only (another node's mask shrinks too).
            rows = keep_global_prompts(rows, arguments)
            if len(set(rows)) == 1:
                return executor(*arguments.args, **arguments.kwargs)
            masks, text_length = masks[:, :0], max(n for n, in rows)  # rows of several lengths: mask the padding

        attention = self.attention_for(rows, masks, entity.mask_sizes, x, arguments.get("ref_latents"), text_length)
        options = host.attention.with_attention_override(arguments.get("transformer_options", {}),
                                                         entity_attention_override)
        options[OPTIONS_KEY] = attention
        options = adapter.text_position_options(host.models.wrapped_diffusion_model(executor), options,
                                                attention.rows, attention.text_length)
        arguments.set("transformer_options", options)
        return executor(*arguments.args, **arguments.kwargs)
