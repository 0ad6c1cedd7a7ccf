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


def layout_rows(segment_lengths):
    """The text layout of every batch row as a tuple of per-row tuples ``(L1 .. LN, LG)``: one row (shared
    by the whole batch) when ``segment_lengths`` is flat or all rows are equal. Within a row an entity of
    length 0 is padding (the row has fewer entities than the batch)."""
    if not len(segment_lengths):
        raise ValueError("no text segments (the global prompt is the last one)")
    first = segment_lengths[0]
    if isinstance(first, (list, tuple)) or torch.is_tensor(first) and first.ndim == 1:
        rows = tuple(tuple(int(n) for n in row) for row in segment_lengths)
    else:
        rows = (tuple(int(n) for n in segment_lengths),)
    if len({len(row) for row in rows}) != 1:
        raise ValueError(f"text layouts of one batch must have one entry per entity slot, got {rows}")
    if any(n < 0 for row in rows for n in row):
        raise ValueError(f"negative text segment length in {rows}")
    return rows[:1] if len(set(rows)) == 1 else rows


def segment_ids(rows, text_length, device=None):
    """``[R, T]`` long: the segment of every text position of each layout row (0..N-1 the entities, N the
    global prompt) and N + 1 for padding (positions after the row's own text, up to ``text_length``)."""
    width = len(rows[0])
    ids = torch.full((len(rows), text_length), width, dtype=torch.long, device=device)
    for r, row in enumerate(rows):
        ids[r, :sum(row)] = torch.repeat_interleave(torch.arange(width, device=device), torch.tensor(row, device=device))
    return ids


def _rows_for(rows, masks):
    """(segment ids ``[B, T]``, masks ``[B, N, T_img]``) with the layout rows and mask rows broadcast to
    one batch size (either may hold one row for all)."""
    batch = max(len(rows), masks.shape[0])
    if {len(rows), masks.shape[0]} - {1, batch}:
        raise ValueError(f"{len(rows)} text layouts for {masks.shape[0]} mask rows")
    return batch, masks.expand(batch, -1, -1) if masks.shape[0] != batch else masks


def entity_attention_mask(segment_lengths, token_masks, text_length=None):
    """Bool "may attend" matrix ``[B, S, S]``, ``S = T + T_img``, ``T = text_length`` (default: the
    longest row's text).

    segment_lengths: ``[L1 .. LN, LG]`` for every row, or one such list per row (``layout_rows``);
    token_masks: bool ``[B, N, T_img]``. Text positions after a row's own text are padding: never a key
    for any query; as queries they see every real token (their output reaches nothing).
    """
    rows = layout_rows(segment_lengths)
    batch, entities, image_tokens = token_masks.shape
    if entities != len(rows[0]) - 1:
        raise ValueError(f"{len(rows[0]) - 1} entity text segments but {entities} masks")
    text = max(sum(row) for row in rows) if text_length is None else int(text_length)
    device = token_masks.device
    batch, token_masks = _rows_for(rows, token_masks)
    segment_of = segment_ids(rows, text, device).expand(batch, -1)           # [B, T]
    padding = segment_of == entities + 1
    # Which image tokens each text segment may see: its mask for entities, all of them for G and padding.
    everything = token_masks.new_ones(batch, 2, image_tokens, dtype=torch.bool)
    sees_image = torch.cat([token_masks.bool(), everything], 1)             # [B, N + 2, T]
    text_image = torch.gather(sees_image, 1, segment_of[:, :, None].expand(-1, -1, image_tokens))  # [B, L, T]
    allowed = torch.ones(batch, text + image_tokens, text + image_tokens, dtype=torch.bool, device=device)
    allowed[:, :text, :text] = (segment_of[:, :, None] == segment_of[:, None, :]) | padding[:, :, None]
    allowed[:, :text, text:] = text_image
    allowed[:, text:, :text] = text_image.transpose(1, 2)
    allowed[:, :, :text] &= ~padding[:, None, :]
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


def augmented_width(head_dim, features):
    """The head dim of the augmented call: D + the rule's feature count, padded to a multiple of 8
    (kernels want that)."""
    width = head_dim + features
    return width + (-width) % 8


def rule_features(segment_lengths, token_masks, text_length=None):
    """Query and key features ``[B or 1, S, F]`` whose dot product is 0 for an allowed pair and -1 for a
    blocked one: the "may attend" rule (``entity_attention_mask``) as a rank-F bias, with no S x S tensor.
    F = 2N + 1, plus 1 when some row has padding.

    Dimensions 0..N (one per text segment): a text key carries its segment's one-hot; a text query
    carries -1 on every other segment; an image query carries -1 on the entities whose mask misses it.
    Dimensions N+1..2N (one per entity): an image key carries 1 for every entity whose mask misses it;
    an entity's text query carries -1 on its own entity. The padding dimension: every query carries -1,
    a padding key 1 (and nothing else), so no query sees padding, while a padding query meets zeros
    everywhere else (it sees every real token). Every other pair meets zeros."""
    rows = layout_rows(segment_lengths)
    _, entities, image_tokens = token_masks.shape
    text = max(sum(row) for row in rows) if text_length is None else int(text_length)
    device = token_masks.device
    batch, token_masks = _rows_for(rows, token_masks) if len(rows) > 1 else (token_masks.shape[0], token_masks)
    segment_of = segment_ids(rows, text, device)                       # [R, T]
    padding = segment_of == entities + 1
    padded = bool(padding.any())
    one_hot = F.one_hot(segment_of, entities + 2)[..., :entities + 1].float()  # [R, T, N+1]; padding: zeros
    real = (~padding)[..., None].float()
    outside = (~token_masks.bool()).transpose(1, 2).float()  # [B, T_img, N]
    width = 2 * entities + 1 + padded
    query = torch.zeros(batch, text + image_tokens, width, device=device)
    key = torch.zeros(batch, text + image_tokens, width, device=device)
    query[:, :text, :entities + 1] = (one_hot - 1) * real
    query[:, text:, :entities] = -outside
    key[:, :text, :entities + 1] = one_hot
    query[:, :text, entities + 1:2 * entities + 1] = -one_hot[..., :entities]
    key[:, text:, entities + 1:2 * entities + 1] = outside
    if padded:
        query[..., -1] = -1
        key[:, :text, -1] = padding.float()
    return query, key


class EntityAttention:
    """What the model patch puts in ``transformer_options[OPTIONS_KEY]`` for one forward pass: the text
    layout (segment lengths, one list for every row or one per row; text positions after a row's own text
    are padding), the image-token masks ``[B or 1, N, T_img]`` and how to apply them. The grouped plan, the
    augmented features, the dense mask and the auto choice are each built once, on first use, and reused
    by every block."""

    def __init__(self, segment_lengths, token_masks, method=AUTO, text_length=None):
        if method not in METHODS:
            raise ValueError(f"entity attention method must be one of {', '.join(METHODS)}, not {method!r}")
        self.rows = layout_rows(segment_lengths)
        if token_masks.shape[1] != len(self.rows[0]) - 1:
            raise ValueError(f"{len(self.rows[0]) - 1} entity text segments but {token_masks.shape[1]} masks")
        _rows_for(self.rows, token_masks)  # the batch sizes fit
        self.token_masks = token_masks.bool()
        self.method = method
        longest = max(sum(row) for row in self.rows)
        self.text_length = longest if text_length is None else int(text_length)
        if self.text_length < longest:
            raise ValueError(f"a text of {self.text_length} tokens cannot hold a layout of {longest}")
        self.padded = any(sum(row) < self.text_length for row in self.rows)
        self.sequence_length = self.text_length + token_masks.shape[-1]
        self._allowed = None
        self._cache = {}
        self._plans = {}

    @property
    def feature_count(self):
        """How many head dimensions the augmented method adds (``rule_features``)."""
        return 2 * self.token_masks.shape[1] + 1 + self.padded

    @property
    def allowed(self):
        """The bool "may attend" matrix ``[B or 1, S, S]`` (dense method and tests only)."""
        if self._allowed is None:
            self._allowed = entity_attention_mask(self.rows, self.token_masks, self.text_length)
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
            query, key_features = rule_features(self.rows, self.token_masks.to(device), self.text_length)
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
            width = augmented_width(head_dim, self.feature_count)
            augmented = len(plan.rows) * self.sequence_length ** 2 * width / head_dim
            self._cache[key] = GROUPED if plan.cost < augmented else AUGMENTED
        return self._cache[key]

    def plan(self, device):
        key = str(device)
        if key not in self._plans:
            self._plans[key] = GroupedPlan(self.rows, self.token_masks.to(device), self.text_length)
        return self._plans[key]


class _RowPlan:
    """The pieces of one batch row's attention (rows with equal layouts and masks share one).

    Image queries are grouped by signature (the set of entities whose mask holds the token): every query
    of a group may see the same keys (G, those entities' text, all image tokens), so a group is one
    unmasked attention call. Entity k's text queries see their own text and the image tokens inside
    mask k (a gather); G's text queries see G and every image token; padding queries (after the row's
    own text) see every real token; no query sees padding. Entities of length 0 (padding) make no call."""

    def __init__(self, masks, segment_lengths, text_length):
        entities, image_tokens = masks.shape
        device = masks.device
        lengths = [int(n) for n in segment_lengths]
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        self.entity_ranges = [(starts[i], starts[i + 1]) for i in range(entities)]
        self.global_range = (starts[entities], starts[entities + 1])
        self.real_text, self.text_length = starts[-1], text_length
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
        global_length, padding = lengths[-1], text_length - self.real_text
        self.pairs = (sum(n * (n + t) for n, t in zip(lengths, inside)) + global_length * (global_length + image_tokens)
                      + image_tokens * (image_tokens + global_length) + sum(n * t for n, t in zip(lengths, inside))
                      + padding * (self.real_text + image_tokens))
        self.calls = sum(1 for n in lengths[:-1] if n) + (global_length > 0) + len(self.groups) + (padding > 0)

    def _with_image(self, tensor, pieces):
        """The text ``pieces`` ((start, end) ranges) of ``tensor``, then every image token (one slice when
        the pieces end where the image starts)."""
        pieces = [(a, b) for a, b in pieces if b > a]
        if pieces and pieces[-1][1] == self.text_length:
            *pieces, (last, _) = pieces
            tail = tensor[:, :, last:]
        else:
            tail = tensor[:, :, self.text_length:]
        return torch.cat([tensor[:, :, a:b] for a, b in pieces] + [tail], dim=2) if pieces else tail

    def text_keys(self, tensor, members):
        """Keys (or values) of the entities in ``members``, then G and every image token."""
        return self._with_image(tensor, [self.entity_ranges[i] for i in members] + [self.global_range])

    def attend(self, attention, q, k, v):
        """``[b, H, S, D]`` output for queries/keys/values ``[b, H, S, D]``."""
        text_length = self.text_length
        image_q, image_k, image_v = q[:, :, text_length:], k[:, :, text_length:], v[:, :, text_length:]
        text = []
        for (a, b), inside in zip(self.entity_ranges, self.entity_image):
            if b == a:
                continue  # a padding entity: no tokens
            keys = torch.cat([k[:, :, a:b], image_k.index_select(2, inside)], dim=2)
            values = torch.cat([v[:, :, a:b], image_v.index_select(2, inside)], dim=2)
            text.append(attention(q[:, :, a:b], keys, values))
        g, end = self.global_range
        if end > g:
            text.append(attention(q[:, :, g:end], self._with_image(k, [(g, end)]), self._with_image(v, [(g, end)])))
        if self.real_text < text_length:
            real = [(0, self.real_text)]
            text.append(attention(q[:, :, self.real_text:text_length], self._with_image(k, real), self._with_image(v, real)))
        image = []
        for members, indices in self.groups:
            queries = image_q if len(self.groups) == 1 else image_q.index_select(2, indices)
            image.append(attention(queries, self.text_keys(k, members), self.text_keys(v, members)))
        image = torch.cat(image, dim=2)
        if len(self.groups) > 1:
            image = image.index_select(2, self.inverse_order)
        return torch.cat(text + [image], dim=2)


class GroupedPlan:
    """Exact entity attention without an S x S mask: batch rows with equal layouts and masks share a
    ``_RowPlan``."""

    def __init__(self, segment_lengths, token_masks, text_length=None):
        layouts = layout_rows(segment_lengths)
        self.text_length = max(sum(row) for row in layouts) if text_length is None else int(text_length)
        batch, token_masks = _rows_for(layouts, token_masks)
        rows = []  # (row indices, plan, layout, mask)
        for b in range(batch):
            layout = layouts[b if len(layouts) > 1 else 0]
            for indices, plan, other_layout, mask in rows:
                if other_layout == layout and torch.equal(mask, token_masks[b]):
                    indices.append(b)
                    break
            else:
                rows.append(([b], _RowPlan(token_masks[b], layout, self.text_length), layout, token_masks[b]))
        self.rows = [(indices, plan) for indices, plan, _, _ in rows]
        self.broadcast = batch == 1
        sequence = self.text_length + token_masks.shape[-1]
        self.sequence_length = sequence
        self.cost = sum(plan.pairs + plan.calls * (CALL_COST_PAIRS + CALL_COST_PER_KEY * sequence)
                        for _, plan in self.rows)

    def attend(self, attention, q, k, v):
        if self.broadcast or len(self.rows) == 1 and len(self.rows[0][0]) == q.shape[0]:
            return self.rows[0][1].attend(attention, q, k, v)
        if q.shape[0] != sum(len(indices) for indices, _ in self.rows):
            raise ValueError(f"entity attention: {sum(len(i) for i, _ in self.rows)} mask rows for a batch of {q.shape[0]}")
        parts, order = [], []
        for indices, plan in self.rows:
            index = torch.tensor(indices, device=q.device)
            pick = (lambda t: t.index_select(0, index))
            parts.append(plan.attend(attention, pick(q), pick(k), pick(v)))
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
    wide = augmented_width(dim, extra)
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
