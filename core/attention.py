"""EliGen's regional attention: masks to the token grid, the "may attend" rule, and the override that
applies it through ComfyUI's attention functions.

The rule (same for FLUX.1 and Qwen-Image; the joint sequence is ``[E1 .. EN, G, image]``):
- a text segment attends to itself; different text segments never see each other (entities are isolated
  from each other and from the global prompt G);
- G <-> every image token; entity k <-> image token t only when t lies inside mask k (both ways);
- image <-> image always.

How it reaches attention (``METHODS``; all give the dense masked attention's result, see docs/design.md
"Entity attention"): ``augmented`` folds the rule into extra head dimensions of one unmasked call,
``grouped`` splits the call into unmasked pieces over the keys each group of queries may see, ``auto``
picks between them, ``dense`` hands over the S x S additive mask (the reference form).
"""

import torch
import torch.nn.functional as F

from . import host
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


# Methods of applying the rule (``patch_model(..., attention=...)``). All give the dense result.
AUTO = "auto"            # the cheaper of augmented and grouped; grouped where augmented could be wrong
AUGMENTED = "augmented"  # one unmasked call; the rule rides in 2N+1 extra head dimensions
GROUPED = "grouped"      # unmasked calls on gathered pieces: exact with any kernel or other override
DENSE = "dense"          # one call with the additive S x S mask (the reference form)
METHODS = (AUTO, AUGMENTED, GROUPED, DENSE)
# What a blocked pair adds to q.k in the augmented method. A power of two (exact in fp16/bf16, below
# fp16's max); divided by the kernel's sqrt(head dim <= 256) it is <= -2048: exp() gives exactly 0.
BLOCKED_PRODUCT = 2.0 ** 15
# auto's estimate of one grouped attention call's overhead (launch, gathering its keys), in query-key
# pairs: CALL_COST_PAIRS + CALL_COST_PER_KEY * S. Set from the CPU figures in the README (Benchmarks,
# "Entity attention methods"); bench/bench_entities.py measures every method, so the GPU figures can correct it.
CALL_COST_PAIRS = 2 ** 16
CALL_COST_PER_KEY = 128


def augmented_width(head_dim, entities):
    """The head dim of the augmented call: D + 2N + 1, padded to a multiple of 8 (kernels want that)."""
    width = head_dim + 2 * entities + 1
    return width + (-width) % 8


def rule_features(segment_lengths, token_masks):
    """Query and key features ``[B or 1, S, 2N+1]`` whose dot product is 0 for an allowed pair and -1 for
    a blocked one: the "may attend" rule as a rank-(2N+1) bias, with no S x S tensor.

    Dimensions 0..N (one per text segment): a text key carries its segment's one-hot; a text query
    carries -1 on every other segment; an image query carries -1 on the entities whose mask misses it.
    Dimensions N+1..2N (one per entity): an image key carries 1 for every entity whose mask misses it;
    an entity's text query carries -1 on its own entity. Every other pair meets zeros."""
    lengths = [int(n) for n in segment_lengths]
    batch, entities, image_tokens = token_masks.shape
    device = token_masks.device
    text = sum(lengths)
    segment_of = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    one_hot = F.one_hot(segment_of, entities + 1).float()  # [L, N+1]
    outside = (~token_masks.bool()).transpose(1, 2).float()  # [B, T, N]
    width = 2 * entities + 1
    query = torch.zeros(batch, text + image_tokens, width, device=device)
    key = torch.zeros(batch, text + image_tokens, width, device=device)
    query[:, :text, :entities + 1] = one_hot - 1
    query[:, text:, :entities] = -outside
    key[:, :text, :entities + 1] = one_hot
    query[:, :text, entities + 1:] = -one_hot[:, :entities]
    key[:, text:, entities + 1:] = outside
    return query, key


class EntityAttention:
    """What the model patch puts in ``transformer_options[OPTIONS_KEY]`` for one forward pass: the text
    segment lengths, the image-token masks ``[B or 1, N, T_img]`` and how to apply them. The grouped
    plan, the augmented features, the dense mask and the auto choice are each built once, on first use,
    and reused by every block."""

    def __init__(self, segment_lengths, token_masks, method=AUTO):
        if method not in METHODS:
            raise ValueError(f"entity attention method must be one of {', '.join(METHODS)}, not {method!r}")
        self.segment_lengths = tuple(int(n) for n in segment_lengths)
        if token_masks.shape[1] != len(self.segment_lengths) - 1:
            raise ValueError(f"{len(self.segment_lengths) - 1} entity text segments but {token_masks.shape[1]} masks")
        self.token_masks = token_masks.bool()
        self.method = method
        self.text_length = sum(self.segment_lengths)
        self.sequence_length = self.text_length + token_masks.shape[-1]
        self._allowed = None
        self._cache = {}
        self._plans = {}

    @property
    def allowed(self):
        """The bool "may attend" matrix ``[B or 1, S, S]`` (dense method and tests only)."""
        if self._allowed is None:
            self._allowed = entity_attention_mask(self.segment_lengths, self.token_masks)
        return self._allowed

    def additive(self, dtype, device):
        key = (dtype, str(device))
        if key not in self._cache:
            self._cache[key] = additive_mask(self.allowed.to(device), dtype)[:, None]  # [B, 1, S, S]
        return self._cache[key]

    def features(self, dtype, device):
        """``rule_features`` scaled for the augmented method, cached per dtype and device."""
        key = ("features", dtype, str(device))
        if key not in self._cache:
            query, key_features = rule_features(self.segment_lengths, self.token_masks.to(device))
            self._cache[key] = ((query * BLOCKED_PRODUCT).to(dtype)[:, None], key_features.to(dtype)[:, None])
        return self._cache[key]

    def auto_method(self, device, head_dim):
        """augmented or grouped, whichever the work estimate says is cheaper: augmented computes all S x S
        pairs at head dim D' (``augmented_width``); grouped computes only the pairs the rule allows, with
        a cost per call. Padded entity text (many text tokens, each seeing few image tokens) favours
        grouped; short entity prompts favour augmented's single call."""
        key = ("auto", str(device), head_dim)
        if key not in self._cache:
            plan = self.plan(device)
            width = augmented_width(head_dim, len(self.segment_lengths) - 1)
            augmented = len(plan.rows) * self.sequence_length ** 2 * width / head_dim
            self._cache[key] = GROUPED if plan.cost < augmented else AUGMENTED
        return self._cache[key]

    def plan(self, device):
        key = str(device)
        if key not in self._plans:
            self._plans[key] = GroupedPlan(self.segment_lengths, self.token_masks.to(device))
        return self._plans[key]


class _RowPlan:
    """The pieces of one batch row's attention (rows with equal masks share one).

    Image queries are grouped by signature (the set of entities whose mask holds the token): every query
    of a group may see the same keys (G, those entities' text, all image tokens), so a group is one
    unmasked attention call. Entity k's text queries see their own text and the image tokens inside
    mask k (a gather); G's text queries see G and every image token (a contiguous slice)."""

    def __init__(self, masks, segment_lengths):
        entities, image_tokens = masks.shape
        device = masks.device
        starts = [0]
        for n in segment_lengths:
            starts.append(starts[-1] + n)
        self.entity_ranges = [(starts[i], starts[i + 1]) for i in range(entities)]
        self.global_start = starts[entities]
        self.entity_image = [masks[i].nonzero().squeeze(1) for i in range(entities)]
        # Signature of every image token as a bit pattern over the entities (at most 16 entities).
        weights = 2 ** torch.arange(entities, device=device, dtype=torch.int64)
        codes = (masks.long() * weights[:, None]).sum(0) if entities else torch.zeros(image_tokens, dtype=torch.int64, device=device)
        values, inverse = torch.unique(codes, return_inverse=True)
        order = torch.argsort(inverse, stable=True)
        sizes = torch.bincount(inverse, minlength=len(values)).tolist()
        self.groups = []  # (entity indices, image-token indices)
        for code, indices in zip(values.tolist(), torch.split(order, sizes)):
            self.groups.append(([i for i in range(entities) if code >> i & 1], indices))
        self.inverse_order = torch.argsort(order)  # concatenated group outputs -> image-token order
        # Query-key pairs this row computes (what the rule allows) and how many attention calls it takes.
        inside = masks.sum(1).tolist()
        lengths = [int(n) for n in segment_lengths]
        global_length = lengths[-1]
        self.pairs = (sum(n * (n + t) for n, t in zip(lengths, inside)) + global_length * (global_length + image_tokens)
                      + image_tokens * (image_tokens + global_length) + sum(n * t for n, t in zip(lengths, inside)))
        self.calls = entities + 1 + len(self.groups)

    def text_keys(self, tensor, members):
        """Keys (or values) of the entities in ``members``, then G and every image token."""
        tail = tensor[:, :, self.global_start:]
        if not members:
            return tail
        return torch.cat([tensor[:, :, a:b] for a, b in (self.entity_ranges[i] for i in members)] + [tail], dim=2)

    def attend(self, attention, q, k, v, text_length):
        """``[b, H, S, D]`` output for queries/keys/values ``[b, H, S, D]``."""
        image_q, image_k, image_v = q[:, :, text_length:], k[:, :, text_length:], v[:, :, text_length:]
        text = []
        for (a, b), inside in zip(self.entity_ranges, self.entity_image):
            keys = torch.cat([k[:, :, a:b], image_k.index_select(2, inside)], dim=2)
            values = torch.cat([v[:, :, a:b], image_v.index_select(2, inside)], dim=2)
            text.append(attention(q[:, :, a:b], keys, values))
        g = self.global_start
        text.append(attention(q[:, :, g:text_length], k[:, :, g:], v[:, :, g:]))
        image = []
        for members, indices in self.groups:
            queries = image_q if len(self.groups) == 1 else image_q.index_select(2, indices)
            image.append(attention(queries, self.text_keys(k, members), self.text_keys(v, members)))
        image = torch.cat(image, dim=2)
        if len(self.groups) > 1:
            image = image.index_select(2, self.inverse_order)
        return torch.cat(text + [image], dim=2)


class GroupedPlan:
    """Exact entity attention without an S x S mask: batch rows with equal masks share a ``_RowPlan``."""

    def __init__(self, segment_lengths, token_masks):
        self.text_length = sum(segment_lengths)
        rows = []  # (row indices, plan)
        for b in range(token_masks.shape[0]):
            for indices, plan, mask in rows:
                if torch.equal(mask, token_masks[b]):
                    indices.append(b)
                    break
            else:
                rows.append(([b], _RowPlan(token_masks[b], segment_lengths), token_masks[b]))
        self.rows = [(indices, plan) for indices, plan, _ in rows]
        self.broadcast = token_masks.shape[0] == 1
        sequence = self.text_length + token_masks.shape[-1]
        self.sequence_length = sequence
        self.cost = sum(plan.pairs + plan.calls * (CALL_COST_PAIRS + CALL_COST_PER_KEY * sequence)
                        for _, plan in self.rows)

    def attend(self, attention, q, k, v):
        if self.broadcast or len(self.rows) == 1 and len(self.rows[0][0]) == q.shape[0]:
            return self.rows[0][1].attend(attention, q, k, v, self.text_length)
        if q.shape[0] != sum(len(indices) for indices, _ in self.rows):
            raise ValueError(f"entity attention: {sum(len(i) for i, _ in self.rows)} mask rows for a batch of {q.shape[0]}")
        parts, order = [], []
        for indices, plan in self.rows:
            index = torch.tensor(indices, device=q.device)
            pick = (lambda t: t.index_select(0, index))
            parts.append(plan.attend(attention, pick(q), pick(k), pick(v), self.text_length))
            order.extend(indices)
        out = torch.cat(parts, dim=0)
        if order != sorted(order):
            out = out.index_select(0, torch.argsort(torch.tensor(order, device=q.device)))
        return out


def _as_additive(mask, dtype):
    # ComfyUI masks come as [S, S], [B, S, S] or [B, H, S, S], bool or float: make them [B|1, H|1, S, S].
    if mask.dtype == torch.bool:
        mask = additive_mask(mask, dtype)
    while mask.ndim < 4:
        mask = mask.unsqueeze(0) if mask.ndim == 2 else mask.unsqueeze(1)
    return mask.to(dtype)


def _with_entity_mask(entity, named):
    q = named["q"]
    mask = entity.additive(q.dtype, q.device)
    if named.get("mask") is not None:
        mask = mask + _as_additive(named["mask"].to(q.device), q.dtype)
    return dict(named, mask=mask)


def _split_heads(named):
    """(q, k, v as ``[B, H, S, D]``, heads, skip_output_reshape, the other arguments) of an unmasked call."""
    named = dict(named)
    q, k, v, heads = [named.pop(name) for name in ("q", "k", "v", "heads")]
    named.pop("mask", None)
    skip_output_reshape = named.pop("skip_output_reshape", False)
    if not named.pop("skip_reshape", False):  # [B, S, H*D] -> [B, H, S, D]
        q, k, v = (t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    return q, k, v, heads, skip_output_reshape, named


def _merge_heads(out, skip_output_reshape):
    return out if skip_output_reshape else out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def _grouped_attention(entity, call, named):
    """The entity rule as unmasked calls of ``call`` on gathered pieces (see ``_RowPlan``); the output has
    the layout the caller asked for."""
    q, k, v, heads, skip_output_reshape, named = _split_heads(named)

    def attention(query, key, value):
        return call(query, key, value, heads, skip_reshape=True, skip_output_reshape=True, **named)

    return _merge_heads(entity.plan(q.device).attend(attention, q, k, v), skip_output_reshape)


def _augmented_attention(entity, call, named):
    """The entity rule as one unmasked call of ``call`` with q, k, v widened by ``rule_features``; q is
    rescaled so that the kernel's 1/sqrt(new head dim) gives the original logits."""
    q, k, v, heads, skip_output_reshape, named = _split_heads(named)
    batch, _, sequence, dim = q.shape
    query_features, key_features = entity.features(q.dtype, q.device)
    extra = query_features.shape[-1]
    wide = augmented_width(dim, (extra - 1) // 2)
    pad = wide - dim - extra
    shape = (batch, heads, sequence)

    def widen(t, features):
        parts = [t] + ([features.expand(*shape, extra)] if features is not None else [])
        width = pad + (extra if features is None else 0)
        if width:
            parts.append(t.new_zeros(*shape, width))
        return torch.cat(parts, dim=-1)

    out = call(widen(q * (wide / dim) ** 0.5, query_features), widen(k, key_features), widen(v, None), heads,
               skip_reshape=True, skip_output_reshape=True, **named)[..., :dim]
    return _merge_heads(out, skip_output_reshape)


def entity_attention_override(previous=None):
    """An ``optimized_attention_override`` that applies the entity rule when ``transformer_options``
    carries an ``EntityAttention`` and the call is the joint text+image attention. Every attention it
    runs goes through ``previous`` (an override installed before) or the attention function ComfyUI
    chose, so other overrides and the chosen kernel keep working. The grouped method falls back to the
    dense mask when the call already carries a mask of its own (another node's), which it then adds;
    so does the augmented method. ``auto`` picks grouped when ``previous`` exists or ComfyUI's chosen
    kernel quantizes q and k, else the cheaper of the two (``EntityAttention.auto_method``)."""
    if getattr(previous, "eligen_override", False):
        return previous

    def call(func):
        if previous is None:
            return func
        return lambda *args, **kwargs: previous(func, *args, **kwargs)

    def override(func, *args, **kwargs):
        entity = (kwargs.get("transformer_options") or {}).get(OPTIONS_KEY)
        if entity is not None:
            named = host.attention.attention_call_arguments(args, kwargs)
            if host.attention.attention_sequence_length(named) == entity.sequence_length:
                method = entity.method
                if method == AUTO:
                    # The extra dimensions need a kernel that computes q.k as given: not a quantizing
                    # one (SageAttention), and not an unknown one that another override may pick.
                    if previous is not None or host.attention.is_quantized_attention(func):
                        method = GROUPED
                    else:
                        q = named["q"]
                        method = entity.auto_method(q.device, q.shape[-1] if named.get("skip_reshape") else q.shape[-1] // named["heads"])
                if method == GROUPED and named.get("mask") is None:
                    return _grouped_attention(entity, call(func), named)
                if method == AUGMENTED and named.get("mask") is None:
                    return _augmented_attention(entity, call(func), named)
                named = _with_entity_mask(entity, named)
                tensors = [named.pop(name) for name in ("q", "k", "v", "heads")]
                return call(func)(*tensors, **named)
        return call(func)(*args, **kwargs)

    override.eligen_override = True
    return override
