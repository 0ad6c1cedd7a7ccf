"""EliGen's regional attention: masks to the token grid, the "may attend" matrix, and the override
that hands it to ComfyUI's attention functions.

The rule (same for FLUX.1 and Qwen-Image; the joint sequence is ``[E1 .. EN, G, image]``):
- a text segment attends to itself; different text segments never see each other (entities are isolated
  from each other and from the global prompt G);
- G <-> every image token; entity k <-> image token t only when t lies inside mask k (both ways);
- image <-> image always.
"""

import torch
from .mask_rule import latent_to_token_grid, masks_to_latent

# transformer_options key under which the model patch hands the mask to the attention override.
OPTIONS_KEY = "eligen_attention"


def mask_to_token_grid(masks, latent_hw, patch=2, mask_sizes=None):
    """Masks ``[..., N, H, W]`` (white = entity, any resolution) -> bool ``[..., N, ceil(h/patch), ceil(w/patch)]``.

    The reference rule (core/mask_rule.py): PIL NEAREST resize of each mask, from its own size
    (``mask_sizes`` when masks of several sizes are stored padded), straight to the latent size; above
    half intensity is inside; a patch is inside if any of its pixels is.
    """
    return latent_to_token_grid(masks_to_latent(masks, latent_hw, mask_sizes), patch)


def entity_attention_mask(segment_lengths, token_masks):
    """Bool "may attend" matrix ``[B, S, S]``, ``S = sum(segment_lengths) + T_img``.

    segment_lengths: ``[L1 .. LN, LG]`` (the last is the global prompt); token_masks: bool ``[B, N, T_img]``.
    """
    lengths = [int(n) for n in segment_lengths]
    batch, entities, image_tokens = token_masks.shape
    if entities != len(lengths) - 1:
        raise ValueError(f"{len(lengths) - 1} entity text segments but {entities} masks")
    device = token_masks.device
    text = sum(lengths)
    segment_of = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                         torch.tensor(lengths, device=device))
    # Which image tokens each text segment may see: its mask for entities, all of them for G.
    sees_image = torch.cat([token_masks.bool(), token_masks.new_ones(batch, 1, image_tokens, dtype=torch.bool)], 1)
    text_image = sees_image[:, segment_of]                                   # [B, L, T]
    allowed = torch.ones(batch, text + image_tokens, text + image_tokens, dtype=torch.bool, device=device)
    allowed[:, :text, :text] = segment_of[:, None] == segment_of[None, :]
    allowed[:, :text, text:] = text_image
    allowed[:, text:, :text] = text_image.transpose(1, 2)
    return allowed


def additive_mask(bool_mask, dtype):
    """0 where allowed, a large finite negative elsewhere (finite so that adding a second mask, or
    interpolating, never makes -inf or NaN)."""
    blocked = torch.finfo(dtype).min / 4
    return torch.zeros(bool_mask.shape, dtype=dtype, device=bool_mask.device).masked_fill(~bool_mask, blocked)


class EntityAttention:
    """What the model patch puts in ``transformer_options[OPTIONS_KEY]`` for one forward pass: the bool
    mask ``[B or 1, S, S]`` and its additive form per dtype/device (built once, reused by every block)."""

    def __init__(self, allowed):
        self.allowed = allowed
        self.sequence_length = allowed.shape[-1]
        self._additive = {}

    def additive(self, dtype, device):
        key = (dtype, str(device))
        if key not in self._additive:
            self._additive[key] = additive_mask(self.allowed.to(device), dtype)[:, None]  # [B, 1, S, S]
        return self._additive[key]


def _as_additive(mask, dtype):
    # ComfyUI masks come as [S, S], [B, S, S] or [B, H, S, S], bool or float: make them [B|1, H|1, S, S].
    if mask.dtype == torch.bool:
        mask = additive_mask(mask, dtype)
    while mask.ndim < 4:
        mask = mask.unsqueeze(0) if mask.ndim == 2 else mask.unsqueeze(1)
    return mask.to(dtype)


def _with_entity_mask(entity, args, kwargs):
    q = args[0]
    sequence = q.shape[2] if kwargs.get("skip_reshape", False) else q.shape[1]
    if sequence != entity.sequence_length:  # not the joint text+image attention: leave it alone
        return args, kwargs
    mask = entity.additive(q.dtype, q.device)
    positional = len(args) > 4
    existing = args[4] if positional else kwargs.get("mask")
    if existing is not None:
        mask = mask + _as_additive(existing.to(q.device), q.dtype)
    if positional:
        args = args[:4] + (mask,) + tuple(args[5:])
    else:
        kwargs = dict(kwargs, mask=mask)
    return args, kwargs


def entity_attention_override(previous=None):
    """An ``optimized_attention_override`` that adds the entity mask when ``transformer_options`` carries
    one, then calls ``previous`` (an override installed before) or the attention function itself."""
    if getattr(previous, "eligen_override", False):
        return previous

    def override(func, *args, **kwargs):
        entity = (kwargs.get("transformer_options") or {}).get(OPTIONS_KEY)
        if entity is not None:
            args, kwargs = _with_entity_mask(entity, args, kwargs)
        if previous is not None:
            return previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    override.eligen_override = True
    return override

