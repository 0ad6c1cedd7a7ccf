"""Entities and the conditioning that carries them to the model.

An entity is a prompt's text embeddings plus a mask. ``apply_entities`` puts the entity embeddings in
front of the global prompt in the positive CONDITIONING (``[E1 .. EN, G]``) and attaches an
``EntityCondition`` under ``model_conds["eligen"]``: ComfyUI batches, repeats and hands it to the
diffusion model as the ``eligen`` keyword argument, where the model patch (core/patch.py) reads it.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import host
from .attention import layout_rows

MAX_ENTITIES = 16
MODEL_CONDS_KEY = "eligen"

# Tokenizer options for entity prompts. FLUX's T5 pads to 256 tokens in ComfyUI; the released FLUX
# EliGen adapter saw every entity padded to 512. Tokenizers without a "t5xxl" part ignore the option
# (Qwen-Image entities are never padded, as in the reference).
TEXT_LENGTHS = {
    "padded_512": {"t5xxl_min_length": 512},
    "real_length": {"t5xxl_min_length": 1},
}


# Text embeddings larger than this are a broken encoder, not a prompt. FLUX.1 (T5-XXL) and Qwen-Image
# (Qwen2.5-VL) prompt embeddings are the encoder's final-norm output: each value is at most sqrt(D) (64
# for D = 4096) times the largest norm weight, far below this; and ComfyUI runs these models in fp16 or
# bf16, where a value past fp16's largest finite number (65504) is already infinity.
MAX_EMBEDDING_MAGNITUDE = float(torch.finfo(torch.float16).max)


@dataclass(frozen=True)
class Entity:
    embeds: torch.Tensor   # [1, L, D] text embeddings of the entity prompt
    mask: torch.Tensor     # [H, W] float32 in [0, 1], white = entity, any resolution
    label: str             # human label, used in messages and previews


def describe(index, label):
    """'entity 2 ("red circle")' - how messages name an entity (1-based, as users count)."""
    return f'entity {index + 1} ("{label}")'


# ---------------------------------------------------------------------------------------------
# Making entities

def entity_mask(mask, name):
    """A MASK (``[H, W]`` or ``[1, H, W]``) -> float32 ``[H, W]`` in [0, 1]; errors start with ``name``
    (see ``describe``)."""
    if mask.ndim == 3:
        if mask.shape[0] != 1:
            raise ValueError(
                f"{name}: the mask input holds {mask.shape[0]} masks but there is one prompt; "
                f"one entity takes one mask (split the batch, one EliGen Entity node per mask)")
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"{name}: a mask must be [H, W] or [1, H, W], not {list(mask.shape)}")
    mask = mask.detach().float().cpu()
    if not bool(torch.isfinite(mask).all()):
        bad = int((~torch.isfinite(mask)).sum())
        raise ValueError(f"{name}: the mask holds {bad} NaN or inf value(s) of {mask.numel()}; a mask must be "
                         f"numbers in [0, 1] (white = the entity)")
    mask = mask.clamp(0.0, 1.0)
    if not bool((mask > 0.5).any()):
        raise ValueError(
            f"{name}: the mask is empty (no pixel above half intensity); paint the "
            f"entity's region white, or remove the entity")
    return mask


def entity_embeds(conditioning, name):
    """The ``[1, L, D]`` embeddings of a one-prompt CONDITIONING."""
    if len(conditioning) != 1:
        raise ValueError(
            f"{name}: the conditioning holds {len(conditioning)} entries; use one text "
            f"encoding per entity (not a combined or concatenated conditioning)")
    embeds = conditioning[0][0]
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[0] != 1:
        raise ValueError(f"{name}: expected text embeddings [1, L, D], got "
                         f"{list(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__}")
    if embeds.shape[1] == 0:
        raise ValueError(f"{name}: the text embeddings hold 0 tokens; the entity's prompt would reach nothing "
                         f"(encode a non-empty prompt)")
    check_embeddings(embeds, name, "the conditioning")
    return embeds.detach()


def embedding_problem(tensor):
    """None for usable text embeddings, else what is wrong with them (NaN, infinite or absurdly large
    values): the one check for entities, layouts and training."""
    values = tensor.detach()
    nan, inf = int(torch.isnan(values).sum()), int(torch.isinf(values).sum())
    if nan or inf:
        return f"hold NaN or inf values ({nan} NaN and {inf} infinite of {values.numel()})"
    peak = float(values.abs().max()) if values.numel() else 0.0
    if peak > MAX_EMBEDDING_MAGNITUDE:
        return (f"hold values as large as {peak:.3g}; text embeddings stay far below {MAX_EMBEDDING_MAGNITUDE:g} "
                f"(the largest fp16 number)")
    return None


def check_embeddings(embeds, name, source):
    """A ValueError naming the entity when its embeddings are unusable (``embedding_problem``), instead
    of the all-black image they would give; ``source`` says where they came from."""
    problem = embedding_problem(embeds)
    if problem:
        raise ValueError(f"{name}: the text embeddings from {source} {problem}; the text encoder or the "
                         f"node that made them is broken (check its weights and precision), so sampling "
                         f"with them would give a black image")


def encode_entity_text(clip, text, text_length="padded_512", name=None):
    """Encode one entity prompt with ``clip`` -> ``[1, L, D]``; errors start with ``name`` (default: the
    prompt)."""
    if text_length not in TEXT_LENGTHS:
        raise ValueError(f"text_length must be one of {', '.join(TEXT_LENGTHS)}, not {text_length!r}")
    tokens = clip.tokenize(text, tokenizer_options=TEXT_LENGTHS[text_length])
    embeds = clip.encode_from_tokens(tokens).detach()
    check_embeddings(embeds, name or f'entity "{text}"', "clip")
    return embeds


def add_entity(previous, entity):
    """A new ELIGEN_ENTITIES tuple: ``previous`` (or nothing) then ``entity``."""
    entities = tuple(previous or ())
    if len(entities) >= MAX_ENTITIES:
        raise ValueError(
            f"too many entities: {describe(len(entities), entity.label)} would be number {len(entities) + 1}; "
            f"EliGen takes at most {MAX_ENTITIES}")
    return entities + (entity,)


# ---------------------------------------------------------------------------------------------
# The model condition

class EntityCondition(host.models.regular_cond_class()):
    """``model_conds["eligen"]``: masks ``[B, N, H, W]`` (``cond``), the text layout, the active step range
    and the entity labels.

    The layout is ``[L1 .. LN, LG]`` (``segment_lengths``) for every row, or one such list per row
    (``rows``) when the rows differ: rows with fewer entities carry zero-length entities with all-zero
    masks (padding), and a row's text may end before the context does (the tokens after it are padding).
    ComfyUI calls ``process_cond`` (repeat to the batch), ``can_concat`` / ``concat`` (batch several
    conditionings into one model call, whatever their entities and prompt lengths); the diffusion model
    receives the result as ``eligen``.
    """

    def __init__(self, masks, segment_lengths, start=0.0, end=1.0, labels=(), mask_sizes=None):
        super().__init__(masks)
        self.rows = layout_rows(segment_lengths)
        if len(self.rows) not in (1, masks.shape[0]):
            raise ValueError(f"{len(self.rows)} text layouts for {masks.shape[0]} mask rows")
        if len(self.rows[0]) != masks.shape[1] + 1:
            raise ValueError(f"{len(self.rows[0]) - 1} entity text segments but {masks.shape[1]} masks")
        self.start = float(start)
        self.end = float(end)
        self.labels = tuple(labels)
        # Each mask's own (H, W) inside the padded [.., N, H, W] tensor; None: all are full size.
        self.mask_sizes = None if mask_sizes is None else tuple((int(h), int(w)) for h, w in mask_sizes)

    @classmethod
    def for_training(cls, segment_lengths, masks, labels=()):
        """The ``eligen`` argument for a direct diffusion-model call: masks ``[B, N, H, W]``, always active;
        ``segment_lengths`` one list for every row or one per row (as ``rows``)."""
        return cls(masks, segment_lengths, 0.0, 1.0, labels)

    @property
    def segment_lengths(self):
        """``(L1 .. LN, LG)`` shared by every row; None when the rows' layouts differ (see ``rows``)."""
        return self.rows[0] if len(self.rows) == 1 else None

    def rows_for(self, batch):
        """One layout per batch row."""
        return self.rows * batch if len(self.rows) == 1 else self.rows

    def sizes(self):
        """(H, W) of every entity's mask, in entity order."""
        return self.mask_sizes or (tuple(self.cond.shape[-2:]),) * self.cond.shape[-3]

    @property
    def masks(self):
        return self.cond

    @property
    def entity_tokens(self):
        """Entity text tokens before the global prompt (of every row; None when the rows differ)."""
        return None if self.segment_lengths is None else sum(self.segment_lengths[:-1])

    def _copy_with(self, cond):
        return EntityCondition(cond, self.rows, self.start, self.end, self.labels, self.mask_sizes)

    def process_cond(self, batch_size, **kwargs):
        if len(self.rows) == 1:
            return super().process_cond(batch_size, **kwargs)
        # Repeat the layouts exactly as ComfyUI repeats the masks: run its repeat on the row numbers.
        order = host.models.regular_cond_class()(torch.arange(len(self.rows))).process_cond(batch_size).cond
        masks = self.cond[order.to(self.cond.device)]
        return EntityCondition(masks, [self.rows[i] for i in order.tolist()], self.start, self.end, self.labels,
                               self.mask_sizes)

    def can_concat(self, other):
        # Any layouts batch together (padded); the masks need one size, each entity's own size the same.
        return (isinstance(other, EntityCondition)
                and other.cond.shape[2:] == self.cond.shape[2:]
                and other.mask_sizes == self.mask_sizes
                and (other.start, other.end) == (self.start, self.end)
                and other.cond.device == self.cond.device)

    def concat(self, others):
        parts = [self] + list(others)
        entities = max(part.cond.shape[1] for part in parts)
        masks = torch.cat([F.pad(part.cond, (0, 0, 0, 0, 0, entities - part.cond.shape[1])) for part in parts])
        rows = [pad_layout(row, entities) for part in parts for row in part.rows_for(part.cond.shape[0])]
        labels = max((part.labels for part in parts), key=len)
        return EntityCondition(masks, rows, self.start, self.end, labels, self.mask_sizes)


def pad_layout(segment_lengths, entities):
    """``(L1 .. Lk, LG)`` with zero-length (padding) entities up to ``entities``: ``(L1 .. Lk, 0 .., LG)``."""
    row = tuple(int(n) for n in segment_lengths)
    return row[:-1] + (0,) * (entities + 1 - len(row)) + row[-1:]


def stack_masks(entities):
    """(masks ``[N, H, W]``, mask_sizes). Masks of different sizes are not resized here (each is resized
    once, from its own size, to the latent: core/mask_rule.py): they are stored top-left in a zero
    tensor of the largest height and width, and ``mask_sizes`` (None when all are equal) gives each
    one's size. All masks must share one aspect ratio (within 2 %): they describe one image."""
    height, width = entities[0].mask.shape
    for index, entity in enumerate(entities):
        h, w = entity.mask.shape
        if (h, w) != (height, width) and abs(h / w - height / width) > 0.02 * height / width:
            raise ValueError(
                f"{describe(index, entity.label)}: mask is {w}x{h} (aspect {w / h:.3f}) but "
                f"{describe(0, entities[0].label)} has {width}x{height} (aspect {width / height:.3f}); "
                f"all entity masks describe one image and need its aspect ratio")
    sizes = tuple(tuple(entity.mask.shape) for entity in entities)
    if len(set(sizes)) == 1:
        return torch.stack([entity.mask for entity in entities]), None
    masks = torch.zeros(len(entities), max(h for h, _ in sizes), max(w for _, w in sizes))
    for index, entity in enumerate(entities):
        masks[index, :sizes[index][0], :sizes[index][1]] = entity.mask
    return masks, sizes


def _prepend_to_attention_mask(options, count):
    # Other nodes' masks stay valid with `count` new text tokens in front: a text padding mask
    # [B, L] gets "valid" entries, a joint mask [B, S, S] (FLUX Redux) gets "no bias" rows/columns.
    mask = options.get("attention_mask")
    if mask is None:
        return options
    allowed = True if mask.dtype == torch.bool else (1 if mask.ndim == 2 else 0)
    if mask.ndim == 2:
        options["attention_mask"] = F.pad(mask, (count, 0), value=allowed)
    elif mask.ndim == 3:
        options["attention_mask"] = F.pad(mask, (count, 0, count, 0), value=allowed)
    return options


def _with_segments(conditioning, segments_for, masks, start, end, labels, mask_sizes=None):
    out = []
    for tensor, options in conditioning:
        segments = [s.to(tensor.device, tensor.dtype).expand(tensor.shape[0], -1, -1) for s in segments_for(tensor)]
        lengths = [s.shape[1] for s in segments] + [tensor.shape[1]]
        options = _prepend_to_attention_mask(dict(options), sum(lengths[:-1]))
        model_conds = dict(options.get("model_conds", {}))
        model_conds[MODEL_CONDS_KEY] = EntityCondition(masks[None], lengths, start, end, labels, mask_sizes)
        options["model_conds"] = model_conds
        out.append([torch.cat(segments + [tensor], dim=1), options])
    return out


def validate_text_width(entities, conditioning, expected_width, what):
    """Every entity and the conditioning must come from the text encoder the model expects."""
    for index, entity in enumerate(entities):
        width = entity.embeds.shape[-1]
        if width != expected_width:
            raise ValueError(
                f"{describe(index, entity.label)}: its text embeddings are {width} wide but {what} expects "
                f"{expected_width}; encode the entity with the same text encoder as the model's prompt")
    for tensor, _ in conditioning:
        if tensor.shape[-1] != expected_width:
            raise ValueError(
                f"the prompt conditioning is {tensor.shape[-1]} wide but {what} expects {expected_width}; "
                f"it comes from a different text encoder")


def apply_entities(positive, entities, negative=None, on_negative=False, start=0.0, end=1.0):
    """(positive, negative) CONDITIONING lists with the entities applied (see the module docstring).

    With ``on_negative`` the negative prompt is copied into every entity slot with the same masks, as
    the reference's "on negative" option does; otherwise the negative is returned unchanged.
    """
    entities = tuple(entities)
    if not entities:
        raise ValueError("no entities given")
    if len(entities) > MAX_ENTITIES:
        raise ValueError(f"{len(entities)} entities given; EliGen takes at most {MAX_ENTITIES}")
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"need 0 <= start_percent <= end_percent <= 1 (got {start}, {end})")
    masks, sizes = stack_masks(entities)
    labels = tuple(entity.label for entity in entities)
    positive = _with_segments(positive, lambda _: [e.embeds for e in entities], masks, start, end, labels, sizes)
    if negative is not None and on_negative:
        negative = _with_segments(negative, lambda g: [g] * len(entities), masks, start, end, labels, sizes)
    return positive, negative
