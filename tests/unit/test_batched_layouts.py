"""Samples with different entity counts and prompt lengths share one forward pass.

A batch row's text is ``[E1 .. Ek, G]`` followed by padding up to the longest row; rows with fewer
entities carry zero-length entities with empty masks. The rule: padding is never a key, in any method.
float64 throughout, both families, every attention method: each row of a batched call equals the same
sample run alone (no padding), on ComfyUI's attention functions, through whole forward passes (prompts
repeated to a common length, as ComfyUI's CONDCrossAttn concat does, with EntityCondition's concat; and
zero padding, as training does), and through the stock sampler batching two conditionings.
"""

import pytest
import torch

import comfy.conds
import comfy.ldm.modules.attention as comfy_attention
import comfy.sample
import comfy.samplers
from comfyui_eligen.core import attention, conditioning, patch
from test_entity_attention import forward, masked_softmax_attention, reference_allowed, run_override, token_masks
from tiny_models import TEXT_WIDTH, entities, prompts, tiny_flux, tiny_qwen_image

FAMILIES = {"flux": tiny_flux, "qwen_image": tiny_qwen_image}
EXACT = 1e-10


def padded_reference(layout, text_length, masks):
    """Element by element for one row: ``layout`` (L1 .. LN, LG) then padding up to ``text_length``. The
    real tokens follow the unpadded reference rule; a padding token is never a key, and as a query it
    sees every real token."""
    real = sum(layout)
    unpadded = torch.from_numpy(reference_allowed(layout, masks.numpy()))
    keep = torch.cat([torch.arange(real), torch.arange(text_length, text_length + masks.shape[-1])])
    size = text_length + masks.shape[-1]
    allowed = torch.zeros(size, size, dtype=torch.bool)
    allowed[keep[:, None], keep[None, :]] = unpadded
    allowed[real:text_length, keep] = True
    return allowed


ROWS = [(3, 0, 0, 4), (2, 5, 1, 3), (0, 0, 0, 6)]  # 1, 3 and no entities; padded to 3 entity slots


def test_the_padded_rule_equals_the_element_by_element_reference():
    generator = torch.Generator().manual_seed(0)
    masks = token_masks(generator, 3, 3, 12)
    for row, layout in enumerate(ROWS):
        # the third row has no entities: empty masks in every slot
        masks[row, sum(1 for n in layout[:-1] if n):] = False  # padding entities: empty masks
    text_length = max(sum(layout) for layout in ROWS) + 2
    allowed = attention.entity_attention_mask(ROWS, masks, text_length)
    for row, layout in enumerate(ROWS):
        assert torch.equal(allowed[row], padded_reference(layout, text_length, masks[row])), layout
        real = sum(layout)
        assert not allowed[row, :, real:text_length].any()  # nobody sees the padding


@pytest.mark.parametrize("shared_masks", [False, True])
def test_methods_equal_dense_with_padded_rows_on_comfy_attention_functions(shared_masks):
    generator = torch.Generator().manual_seed(7)
    heads, dim, tokens = 2, 8, 7 * 5
    masks = token_masks(generator, 1 if shared_masks else 3, 3, tokens)
    text_length = max(sum(layout) for layout in ROWS) + 3
    sequence = text_length + tokens
    q, k, v = (torch.randn(3, heads, sequence, dim, generator=generator, dtype=torch.float64) for _ in range(3))
    dense = attention.EntityAttention(ROWS, masks, attention.DENSE, text_length)
    expected = masked_softmax_attention(q, k, v, dense.allowed)
    for func in (comfy_attention.attention_pytorch, comfy_attention.attention_basic,
                 comfy_attention.attention_sub_quad, comfy_attention.attention_split):
        for method in attention.METHODS:
            ours = run_override(attention.EntityAttention(ROWS, masks, method, text_length), func, q, k, v, heads, True)
            ours = ours.view(3, sequence, heads, dim).transpose(1, 2)
            assert (ours - expected).abs().max().item() < EXACT, (func.__name__, method)
            # each row alone, without padding, gives the same real tokens
            for row, layout in enumerate(ROWS):
                keep = torch.cat([torch.arange(sum(layout)), torch.arange(text_length, sequence)])
                alone = attention.EntityAttention([layout], masks[row if not shared_masks else 0][None], method)
                single = run_override(alone, func, *(t[row:row + 1, :, keep] for t in (q, k, v)), heads, True)
                single = single.view(1, len(keep), heads, dim).transpose(1, 2)
                assert (single[0] - ours[row][:, keep]).abs().max().item() < EXACT, (func.__name__, method, layout)


# ---------------------------------------------------------------------------------------------
# Whole forward passes (float64)

def blob_masks(generator, count, h, w):
    masks = (torch.rand(1, count, 4 * h, 4 * w, generator=generator) < 0.5).double()
    return torch.nn.functional.avg_pool2d(masks, 5, 1, 2).round()[0]


# (entity lengths, global length) per sample: different entity counts and prompt lengths. The totals
# (6, 12, 12) let ComfyUI batch them (it repeats the shortest prompt twice).
SAMPLES = [([2], 4), ([3, 1, 4], 4), ([5, 2], 5)]


def sample_inputs(family, generator, latent_hw=(9, 7)):
    frames = (1,) if family == "qwen_image" else ()
    h, w = latent_hw
    out = []
    for lengths, global_length in SAMPLES:
        out.append({
            "x": torch.randn((1, 16) + frames + latent_hw, generator=generator, dtype=torch.float64),
            "context": torch.randn(1, sum(lengths) + global_length, TEXT_WIDTH, generator=generator, dtype=torch.float64),
            "pooled": torch.randn(1, TEXT_WIDTH, generator=generator, dtype=torch.float64),
            "sigma": torch.rand(1, generator=generator, dtype=torch.float64),
            "condition": conditioning.EntityCondition.for_training(
                lengths + [global_length], blob_masks(generator, len(lengths), h, w)[None]),
        })
    return out


def batched(inputs, context):
    return (torch.cat([i["x"] for i in inputs]), torch.cat([i["sigma"] for i in inputs]), context,
            torch.cat([i["pooled"] for i in inputs]))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_of_different_layouts_equals_each_sample_alone(family):
    """Sampling path (ComfyUI's CONDCrossAttn concat repeats the shorter prompts; EntityCondition.concat
    pads the entities) and training path (zero padding to the longest prompt), every method."""
    generator = torch.Generator().manual_seed(3)
    base = FAMILIES[family](dtype=torch.float64)
    inputs = sample_inputs(family, generator)
    crossattn = [comfy.conds.CONDCrossAttn(i["context"]) for i in inputs]
    assert all(crossattn[0].can_concat(c) for c in crossattn[1:])  # ComfyUI would batch them
    repeated = crossattn[0].concat(crossattn[1:])
    assert repeated.shape[1] == 12
    condition = inputs[0]["condition"].concat([i["condition"] for i in inputs[1:]])
    assert inputs[0]["condition"].can_concat(inputs[1]["condition"]) and condition.segment_lengths is None
    longest = max(i["context"].shape[1] for i in inputs)
    padded = torch.cat([torch.nn.functional.pad(i["context"], (0, 0, 0, longest - i["context"].shape[1]))
                        for i in inputs])
    training = conditioning.EntityCondition.for_training(condition.rows, condition.masks)
    first = inputs[0]
    plain = forward(base, first["x"], first["sigma"], first["context"], first["pooled"], None)
    for method in attention.METHODS:
        model = patch.patch_model(base, attention=method)
        alone = torch.cat([forward(model, i["x"], i["sigma"], i["context"], i["pooled"], i["condition"]) for i in inputs])
        for name, context, cond in (("sampling", repeated, condition), ("training", padded, training)):
            together = forward(model, *batched(inputs, context), cond)
            assert (together - alone).abs().max().item() < EXACT, (method, name)
        assert (alone[0] - plain).abs().max().item() > 1e-4  # the entities matter in this case


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_without_entities_and_with_padding_equal_plain_prompts(family):
    """A row without entities in a padded batch gives the plain forward of its prompt."""
    generator = torch.Generator().manual_seed(5)
    base = FAMILIES[family](dtype=torch.float64)
    inputs = sample_inputs(family, generator)
    rows = [conditioning.pad_layout(lengths + [g], 3) for lengths, g in SAMPLES[:2]] + [(0, 0, 0, 3)]
    masks = torch.cat([torch.nn.functional.pad(i["condition"].masks, (0, 0, 0, 0, 0, 3 - i["condition"].masks.shape[1]))
                       for i in inputs[:2]] + [torch.zeros(1, 3, *inputs[0]["condition"].masks.shape[-2:], dtype=torch.float64)])
    plain_prompt = torch.randn(1, 3, TEXT_WIDTH, generator=generator, dtype=torch.float64)
    contexts = [inputs[0]["context"], inputs[1]["context"], plain_prompt]
    longest = max(c.shape[1] for c in contexts)
    context = torch.cat([torch.nn.functional.pad(c, (0, 0, 0, longest - c.shape[1])) for c in contexts])
    model = patch.patch_model(base)
    together = forward(model, *batched(inputs, context), conditioning.EntityCondition.for_training(rows, masks))
    alone = forward(base, inputs[2]["x"], inputs[2]["sigma"], plain_prompt, inputs[2]["pooled"], None)
    assert (together[2:] - alone).abs().max().item() < EXACT


# ---------------------------------------------------------------------------------------------
# The stock sampler batching two conditionings of different layouts


class LayoutRecorder:
    """An attention override installed after EliGen: records the layouts of every entity call."""

    def __init__(self):
        self.layouts = []

    def __call__(self, func, *args, **kwargs):
        entity = (kwargs.get("transformer_options") or {}).get(attention.OPTIONS_KEY)
        if entity is not None:
            self.layouts.append(entity.rows)
        return func(*args, **kwargs)


def each_alone(args):
    """The reference batching: every conditioning of a list in a call of its own (ComfyUI's own
    calc_cond_batch), then their average (full-area conditionings of strength 1)."""
    out = []
    for conds in args["conds"]:
        if conds is None:
            out.append(None)
            continue
        single = [comfy.samplers.calc_cond_batch(args["model"], [[c]], args["input"], args["sigma"],
                                                 args["model_options"])[0] for c in conds]
        out.append(sum(single) / len(single))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_the_sampler_batches_conditionings_of_different_layouts(family):
    base = FAMILIES[family](dtype=torch.float64)
    first, negative = prompts(global_length=6)
    # Both 14 text tokens, split differently: FLUX.1 and Qwen-Image hand the prompt to ComfyUI as a
    # CONDRegular, which batches equal lengths only (the repeating concat is tested above).
    second, _ = prompts(seed=4, global_length=10)
    # Entities for the first half of the steps: later steps keep each row's caption only (6 and 10
    # tokens: padded, with no entities).
    first, _ = conditioning.apply_entities(first, entities(2, (64, 80), lengths=(3, 5)), end=0.5)
    second, _ = conditioning.apply_entities(second, entities(3, (64, 80), lengths=(2, 1, 1), seed=2), end=0.5)
    positive = first + second  # ConditioningCombine: both predictions, averaged
    shape = (2, 16) + ((1,) if family == "qwen_image" else ()) + (8, 10)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def run(model):
        return comfy.sample.sample(model, noise, 3, 2.5, "euler", "simple", positive, negative,
                                   torch.zeros(shape, dtype=torch.float64), disable_pbar=True, seed=0)

    for method in attention.METHODS:
        recorder = LayoutRecorder()
        model = patch.patch_model(base, attention=method)
        recorded = model.clone()
        recorded.model_options["transformer_options"]["optimized_attention_override"] = recorder
        together = run(recorded)
        # 2 layouts x 2 latents in one call: with entities, then the captions alone
        assert {tuple(sorted(rows)) for rows in recorder.layouts if len(rows) == 4} == {
            ((2, 1, 1, 10), (2, 1, 1, 10), (3, 5, 0, 6), (3, 5, 0, 6)), ((6,), (6,), (10,), (10,))}, recorder.layouts
        reference = model.clone()
        reference.model_options["sampler_calc_cond_batch_function"] = each_alone
        alone = run(reference)
        assert (together - alone).abs().max().item() < EXACT * max(1.0, alone.abs().max().item()), method
