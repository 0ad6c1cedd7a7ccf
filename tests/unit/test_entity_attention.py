"""Entity attention, both halves of its proof.

1. The attention mask EliGen really hands to attention, against the reference rule.

The mask is captured during a real sampling step (comfy.sample.sample on a tiny FLUX.1 / Qwen-Image)
by an attention override installed on the model before EliGen; EliGen's own override chains it, so the
recorder sees exactly what the attention function receives. It is compared with
- an independent, loop-by-loop re-implementation of the reference rule (PIL nearest resize, half
  threshold, 2x2 "any pixel" patches, the segment rules), for every case; and
- the reference's own ``construct_mask`` from diffsynth==2.1.12 (installed by scripts/setup.sh without
  its dependencies; tests/support/diffsynth_reference.py loads only its flux_dit module; the test fails when it
  is missing), where the case fits its assumptions (equal segment lengths, even latent sizes).

2. The entity attention methods without an S x S mask (auto, the default; augmented; grouped) against the
dense masked attention (the reference form).

float64 throughout where the comparison must be exact (max abs difference below 1e-10): the bare
override on ComfyUI's own attention functions, then whole forward passes of tiny FLUX.1 and Qwen-Image
models (every double and single block's attention goes through the override), then real sampling with
comfy.sample.sample. Cases: 1-8 entities, overlapping masks, masks that cover no token at the latent
size, odd latent sizes, batch rows with different masks, reference latents, CFG with a negative without
entities or with the entities copied, another attention override installed after EliGen.
"""

import numpy as np
import pytest
import torch
from PIL import Image

import comfy.ldm.modules.attention as comfy_attention
import comfy.sample
from comfyui_eligen.core import attention, conditioning, host, patch
from comfyui_eligen.core.adapters import adapter_for
from diffsynth_reference import flux_dit_reference
from tiny_models import TEXT_WIDTH, entities, prompts, tiny_flux, tiny_qwen_image

FAMILIES = {"flux": tiny_flux, "qwen_image": tiny_qwen_image}
EXACT = 1e-10
FAST = [m for m in attention.METHODS if m != attention.DENSE]

# ---------------------------------------------------------------------------------------------
# The reference rule, written independently of core/attention.py.

def reference_latent_mask(mask_u8, latent_hw):
    """PIL nearest resize of the 8-bit mask image to the latent size, then "> half" (the reference
    maps pixels to [-1, 1] and keeps > 0)."""
    h, w = latent_hw
    resized = Image.fromarray(mask_u8).resize((w, h), resample=Image.NEAREST)
    return np.asarray(resized) > 127.5


def reference_token_mask(latent_mask):
    """A 2x2 patch is inside if any of its (existing) pixels is."""
    h, w = latent_mask.shape
    out = np.zeros(((h + 1) // 2, (w + 1) // 2), dtype=bool)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = latent_mask[2 * i:2 * i + 2, 2 * j:2 * j + 2].any()
    return out.reshape(-1)


def reference_allowed(segment_lengths, token_masks):
    """Element by element: [E1..EN, G, image]."""
    owner = [s for s, n in enumerate(segment_lengths) for _ in range(n)]
    text, image = len(owner), len(token_masks[0])
    global_segment = len(segment_lengths) - 1
    allowed = np.zeros((text + image, text + image), dtype=bool)
    for a in range(text + image):
        for b in range(text + image):
            if a >= text and b >= text:
                allowed[a, b] = True
            elif a < text and b < text:
                allowed[a, b] = owner[a] == owner[b]
            else:
                segment = owner[a] if a < text else owner[b]
                token = b - text if a < text else a - text
                allowed[a, b] = segment == global_segment or bool(token_masks[segment][token])
    return allowed


@pytest.fixture(scope="module")
def diffsynth():
    return flux_dit_reference()  # fails (never skips) when diffsynth==2.1.12 is not installed


# ---------------------------------------------------------------------------------------------
# Capturing what attention receives.

class Recorder:
    """An attention override that notes the mask and sequence length of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, func, *args, **kwargs):
        mask = args[4] if len(args) > 4 else kwargs.get("mask")
        q = args[0]
        sequence = q.shape[2] if kwargs.get("skip_reshape") else q.shape[1]
        self.calls.append({"mask": None if mask is None else mask.clone(), "sequence": sequence,
                           "batch": q.shape[0], "block": kwargs["transformer_options"].get("block_type")})
        return func(*args, **kwargs)


def sample_and_record(model, positive, negative, latent, cfg=1.0, steps=1, seed=0):
    recorder = Recorder()
    model = model.clone()
    model.model_options["transformer_options"]["optimized_attention_override"] = recorder
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    out = comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent,
                              disable_pbar=True, seed=seed)
    return out, recorder.calls


def random_mask_u8(generator, size, kind):
    h, w = size
    if kind == "zero":
        return np.zeros((h, w), np.uint8)
    if kind == "one":
        return np.full((h, w), 255, np.uint8)
    if kind == "noise":
        return torch.randint(0, 256, (h, w), generator=generator).numpy().astype(np.uint8)
    # a rectangle with soft random values inside and out
    top, left = [int(torch.randint(0, n // 2, (1,), generator=generator)) for n in (h, w)]
    bottom = top + int(torch.randint(h // 4, h - top + 1, (1,), generator=generator))
    right = left + int(torch.randint(w // 4, w - left + 1, (1,), generator=generator))
    mask = torch.randint(0, 120, (h, w), generator=generator)
    mask[top:bottom, left:right] = torch.randint(136, 256, (bottom - top, right - left), generator=generator)
    return mask.numpy().astype(np.uint8)


CASES = [
    # id, family, latent (h, w), mask image size, mask kinds, entity lengths, global length, batch
    ("one-entity-square", "flux", (16, 16), (128, 128), ["box"], [4], 4, 1),
    ("three-overlapping-wide", "flux", (12, 20), (96, 160), ["box", "box", "noise"], [5, 5, 5], 5, 2),
    ("eight-with-empty-and-full", "flux", (14, 10), (70, 50),
     ["box", "zero", "one", "noise", "box", "noise", "box", "box"], [3] * 8, 3, 1),
    ("odd-latent-uneven-text", "flux", (13, 9), (130, 90), ["box", "noise", "one", "box"], [2, 6, 3, 4], 7, 2),
    ("qwen-two-tall", "qwen_image", (18, 10), (180, 100), ["box", "noise"], [3, 6], 5, 2),
    ("qwen-five-odd", "qwen_image", (11, 15), (44, 60), ["noise", "box", "zero", "box", "one"], [2, 3, 4, 5, 6], 4, 1),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_mask_handed_to_attention_is_the_reference_mask(case, diffsynth):
    name, family, latent_hw, mask_size, kinds, lengths, global_length, batch = case
    generator = torch.Generator().manual_seed(len(name))
    model = {"flux": tiny_flux, "qwen_image": tiny_qwen_image}[family]()
    masks_u8 = [random_mask_u8(generator, mask_size, kind) for kind in kinds]
    entities = tuple(
        conditioning.Entity(torch.randn(1, n, TEXT_WIDTH, generator=generator),
                            torch.from_numpy(m).float() / 255.0, f"e{i}")
        for i, (n, m) in enumerate(zip(lengths, masks_u8)))
    positive = [[torch.randn(1, global_length, TEXT_WIDTH, generator=generator),
                 {"pooled_output": torch.randn(1, TEXT_WIDTH, generator=generator)}]]
    negative = [[torch.zeros(1, 3, TEXT_WIDTH), {"pooled_output": torch.zeros(1, TEXT_WIDTH)}]]
    positive, negative = conditioning.apply_entities(positive, entities, negative)
    latent_shape = (batch, 16) + ((1,) if family == "qwen_image" else ()) + latent_hw
    dense = patch.patch_model(model, attention="dense")  # the method that hands attention the mask
    _, calls = sample_and_record(dense, positive, negative, torch.zeros(latent_shape))

    segment_lengths = lengths + [global_length]
    token_masks = [reference_token_mask(reference_latent_mask(m, latent_hw)) for m in masks_u8]
    expected = reference_allowed(segment_lengths, token_masks)
    assert len(calls) > 0
    for call in calls:  # every attention call of every block got the mask
        assert call["mask"] is not None, call["block"]
        assert call["sequence"] == expected.shape[0]
        mask = call["mask"]
        assert mask.shape[-2:] == expected.shape and mask.shape[0] in (1, batch)
        allowed = (mask == 0).numpy()
        assert bool(((mask == 0) | (mask <= torch.finfo(mask.dtype).min / 8)).all())  # 0 or "blocked" only
        for b in range(mask.shape[0]):
            for h in range(mask.shape[1]):
                np.testing.assert_array_equal(allowed[b, h], expected)

    fits_diffsynth = len(set(segment_lengths)) == 1 and latent_hw[0] % 2 == 0 and latent_hw[1] % 2 == 0
    if fits_diffsynth:
        latent_masks = [torch.from_numpy(reference_latent_mask(m, latent_hw)).float()[None, None] for m in masks_u8]
        latent_masks.append(torch.ones_like(latent_masks[0]))
        reference = diffsynth.construct_mask(latent_masks, global_length, len(token_masks[0]))
        reference_allowed_ = (reference[0] == 0).numpy()
        np.testing.assert_array_equal(reference_allowed_, expected)  # our reading of the rule is theirs
        np.testing.assert_array_equal((calls[0]["mask"][0, 0] == 0).numpy(), reference_allowed_)


# ---------------------------------------------------------------------------------------------
# The core functions on their own (fast, many shapes).

@pytest.mark.parametrize("latent_hw", [(1, 1), (2, 3), (7, 5), (16, 9), (33, 64)])
def test_token_grid_follows_the_reference_rule(latent_hw):
    generator = torch.Generator().manual_seed(sum(latent_hw))
    for size in [(latent_hw[0] * 8, latent_hw[1] * 8), (latent_hw[0] * 3 + 1, latent_hw[1] * 3 + 2), latent_hw]:
        mask_u8 = torch.randint(0, 256, size, generator=generator).numpy().astype(np.uint8)
        ours = attention.mask_to_token_grid(torch.from_numpy(mask_u8).float() / 255.0, latent_hw)
        expected = reference_token_mask(reference_latent_mask(mask_u8, latent_hw))
        np.testing.assert_array_equal(ours.flatten().numpy(), expected)


def test_additive_mask_is_finite_and_sums_safely():
    allowed = torch.tensor([[True, False], [False, True]])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        mask = attention.additive_mask(allowed, dtype)
        assert mask[0, 0] == 0 and mask[0, 1] < -1000
        assert torch.isfinite(mask + mask).all()  # two masks added never reach -inf


# =============================================================================================
# 2. The methods without an S x S mask against the dense masked attention.

def token_masks(generator, batch, entities, tokens, empty=(), full=()):
    """Random overlapping masks ``[batch, entities, tokens]`` (about 40 % coverage each)."""
    masks = torch.rand(batch, entities, tokens, generator=generator) < 0.4
    for k in empty:
        masks[:, k] = False
    for k in full:
        masks[:, k] = True
    return masks


def run_override(entity, func, q, k, v, heads, skip_reshape, extra=None):
    options = {attention.OPTIONS_KEY: entity, "optimized_attention_override": attention.entity_attention_override(extra)}
    return func(q, k, v, heads, skip_reshape=skip_reshape, transformer_options=options)


def masked_softmax_attention(q, k, v, allowed):
    """Plain float64 attention with a bool mask ``[B|1, S, S]``: the definition, written out."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return scores.softmax(-1) @ v


# ---------------------------------------------------------------------------------------------
# The bare override on ComfyUI's attention functions

@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_methods_equal_dense_on_comfy_attention_functions(count):
    generator = torch.Generator().manual_seed(count)
    heads, dim = 2, 8
    lengths = [int(n) for n in torch.randint(1, 6, (count,), generator=generator)] + [4]
    tokens = 7 * 5  # an odd latent grid
    masks = token_masks(generator, 2, count, tokens, empty=(0,) if count > 2 else (), full=(1,) if count > 3 else ())
    masks[1, -1] = ~masks[1, -1]  # the two batch rows differ
    sequence = sum(lengths) + tokens
    q, k, v = (torch.randn(2, heads, sequence, dim, generator=generator, dtype=torch.float64) for _ in range(3))
    dense = attention.EntityAttention(lengths, masks, attention.DENSE)
    expected = masked_softmax_attention(q, k, v, dense.allowed)
    for func in (comfy_attention.attention_pytorch, comfy_attention.attention_basic,
                 comfy_attention.attention_sub_quad, comfy_attention.attention_split):
        for skip_reshape, method in [(s, m) for s in (True, False) for m in FAST]:
            args = (q, k, v) if skip_reshape else tuple(t.transpose(1, 2).reshape(2, sequence, heads * dim) for t in (q, k, v))
            ours = run_override(attention.EntityAttention(lengths, masks, method), func, *args, heads, skip_reshape)
            reference = run_override(dense, func, *args, heads, skip_reshape)
            assert ours.shape == reference.shape
            assert (ours - reference).abs().max().item() < EXACT, (func.__name__, skip_reshape, method)
            ours = ours.view(2, sequence, heads, dim).transpose(1, 2)  # [B, S, H*D] in both layouts
            assert (ours - expected).abs().max().item() < EXACT


def test_grouped_calls_never_carry_a_mask_and_stay_below_the_joint_length():
    """What an attention override installed before EliGen sees: pieces, each unmasked, none of them the
    full joint sequence when there are entities; the work equals one joint call's (every query once)."""
    generator = torch.Generator().manual_seed(0)
    lengths, tokens = [3, 4, 5], 30
    masks = token_masks(generator, 1, 2, tokens)
    entity = attention.EntityAttention(lengths, masks, attention.AUTO)  # another override: auto groups
    sequence = sum(lengths) + tokens
    q, k, v = (torch.randn(1, 2, sequence, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    recorder = Recorder()
    run_override(entity, comfy_attention.attention_pytorch, q, k, v, 2, True, extra=recorder)
    assert recorder.calls and all(call["mask"] is None and call["sequence"] < sequence for call in recorder.calls)
    assert sum(call["sequence"] for call in recorder.calls) == sequence


def test_another_mask_on_the_call_falls_back_to_the_dense_sum():
    generator = torch.Generator().manual_seed(3)
    lengths, tokens = [2, 3, 4], 20
    masks = token_masks(generator, 1, 2, tokens)
    sequence = sum(lengths) + tokens
    q, k, v = (torch.randn(1, 2, sequence, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    other = torch.randn(1, sequence, sequence, generator=generator, dtype=torch.float64)
    outputs = []
    for method in attention.METHODS:
        entity = attention.EntityAttention(lengths, masks, method)
        options = {attention.OPTIONS_KEY: entity, "optimized_attention_override": attention.entity_attention_override()}
        outputs.append(comfy_attention.attention_pytorch(q, k, v, 2, mask=other, skip_reshape=True, transformer_options=options))
    expected = comfy_attention.attention_pytorch(q, k, v, 2, mask=other + attention.additive_mask(
        attention.entity_attention_mask(lengths, masks), torch.float64), skip_reshape=True)
    assert torch.equal(outputs[0], outputs[1]) and (outputs[0] - expected).abs().max().item() < EXACT


def test_augmented_keeps_blocked_pairs_at_zero_weight_in_half_precision():
    """fp16/bf16 (GPU dtypes, run here on the CPU): the extra dimensions stay finite and blocked pairs get
    no weight, so the result is the dense one up to the dtype's rounding."""
    generator = torch.Generator().manual_seed(5)
    lengths, tokens = [3, 4, 5, 6], 48
    masks = token_masks(generator, 1, 3, tokens)
    sequence = sum(lengths) + tokens
    q, k, v = (4 * torch.randn(1, 2, sequence, 64, generator=generator) for _ in range(3))
    dense = masked_softmax_attention(q.double(), k.double(), v.double(), attention.entity_attention_mask(lengths, masks))
    for dtype in (torch.float16, torch.bfloat16):
        entity = attention.EntityAttention(lengths, masks, attention.AUGMENTED)
        out = run_override(entity, comfy_attention.attention_pytorch, q.to(dtype), k.to(dtype), v.to(dtype), 2, True)
        out = out.view(1, sequence, 2, 64).transpose(1, 2).double()
        assert torch.isfinite(out).all()
        assert (out - dense).abs().max().item() < 0.05 * dense.abs().max().item(), dtype


def test_auto_groups_under_a_quantizing_kernel():
    from comfyui_eligen.core import host

    assert host.attention.is_quantized_attention(comfy_attention.attention_sage)
    assert host.attention.is_quantized_attention(comfy_attention.attention_sage.__wrapped__)
    assert not host.attention.is_quantized_attention(comfy_attention.attention_pytorch.__wrapped__)


def test_auto_picks_grouped_for_padded_text_and_augmented_for_short_prompts():
    """Padded entity text: most query-key pairs are blocked, grouped computes only the allowed ones; short
    prompts: augmented's one call beats grouped's many."""
    masks = torch.zeros(1, 8, 12, 12, dtype=torch.bool)
    for k in range(8):
        masks[0, k, k % 6:k % 6 + 4, k // 2:k // 2 + 4] = True
    masks = masks.flatten(2)
    padded = attention.EntityAttention([512] * 8 + [32], masks)
    short = attention.EntityAttention([8] * 8 + [32], masks)
    assert padded.auto_method("cpu", 64) == attention.GROUPED
    assert short.auto_method("cpu", 64) == attention.AUGMENTED


def test_unknown_method_is_an_error_naming_it():
    with pytest.raises(ValueError, match="'sparse'"):
        attention.EntityAttention([2, 3], torch.ones(1, 1, 4, dtype=torch.bool), "sparse")
    with pytest.raises(ValueError, match="'sparse'"):
        patch.patch_model(tiny_flux(), attention="sparse")


# ---------------------------------------------------------------------------------------------
# Whole forward passes of the tiny models (float64): every block's joint attention

def forward(model, x, sigma, context, pooled, condition, ref_latents=None):
    """The diffusion model's forward as training calls it, optionally with reference latents."""
    adapter = adapter_for(model)
    base_model = model.model
    options = host.models.sampling_transformer_options(model)
    diffusion_model = base_model.diffusion_model
    timestep = base_model.model_sampling.timestep(sigma).to(x.dtype)
    kwargs = adapter.forward_kwargs(diffusion_model, pooled, x.shape[0])
    if ref_latents is not None:
        kwargs["ref_latents"] = ref_latents
    return diffusion_model(x, timestep, context, transformer_options=options, eligen=condition, **kwargs)


FORWARD_CASES = [
    # id, family, latent (h, w), entity lengths, global length, batch, rows differ, reference latent (h, w)
    ("flux-1", "flux", (8, 8), [3], 4, 1, False, None),
    ("flux-3-odd", "flux", (9, 13), [2, 5, 3], 4, 2, True, None),
    ("flux-8-odd", "flux", (11, 7), [3, 1, 4, 1, 5, 2, 6, 2], 5, 2, True, None),
    ("flux-4-reference", "flux", (8, 12), [2, 3, 2, 3], 4, 2, False, (6, 8)),
    ("qwen-2", "qwen_image", (8, 10), [3, 6], 5, 2, True, None),
    ("qwen-6-odd", "qwen_image", (13, 9), [2, 3, 4, 5, 6, 1], 4, 1, False, None),
    ("qwen-3-reference", "qwen_image", (10, 8), [4, 2, 3], 3, 2, True, (7, 9)),
]


@pytest.mark.parametrize("case", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_model_forward_equals_dense(case):
    name, family, latent_hw, lengths, global_length, batch, rows_differ, reference_hw = case
    generator = torch.Generator().manual_seed(len(name))
    base = FAMILIES[family](dtype=torch.float64)
    count = len(lengths)
    h, w = latent_hw
    masks = (torch.rand(batch, count, 4 * h, 4 * w, generator=generator) < 0.5).double()
    masks = torch.nn.functional.avg_pool2d(masks, 5, 1, 2).round()  # blobs, overlapping between entities
    masks[:, 0] = 0
    masks[:, 0, :2 * h, :2 * w] = 1  # a box
    if count > 2:
        masks[:, 1] = 0
        masks[:, 1, 0, 0] = 1  # one pixel in 8x8: inside no token at the latent size ("empty on the grid")
    if not rows_differ:
        masks = masks[:1].expand(batch, -1, -1, -1)
    frames = (1,) if family == "qwen_image" else ()
    x = torch.randn((batch, 16) + frames + latent_hw, generator=generator, dtype=torch.float64)
    context = torch.randn(batch, sum(lengths) + global_length, TEXT_WIDTH, generator=generator, dtype=torch.float64)
    pooled = torch.randn(batch, TEXT_WIDTH, generator=generator, dtype=torch.float64)
    sigma = torch.rand(batch, generator=generator, dtype=torch.float64)
    references = None
    if reference_hw is not None:
        references = [torch.randn((batch, 16) + frames + reference_hw, generator=generator, dtype=torch.float64)]
    condition = conditioning.EntityCondition.for_training(lengths + [global_length], masks)
    outputs = {}
    for method in attention.METHODS:
        model = patch.patch_model(base, attention=method)
        outputs[method] = forward(model, x, sigma, context, pooled, condition, references)
    plain = forward(base, x, sigma, context, pooled, None, references)
    for method in FAST:
        assert (outputs[method] - outputs[attention.DENSE]).abs().max().item() < EXACT, method
    assert (outputs[attention.DENSE] - plain).abs().max().item() > 1e-4  # the rule matters in this case


# ---------------------------------------------------------------------------------------------
# Sampling (comfy.sample.sample): the same images as the dense path

STEPS = 2


def rounding_tolerance(reference, model, steps=STEPS):
    """How far float sampling with another attention method may drift from the dense reference by
    rounding alone: ``16 * eps(dtype) * max|reference| * sqrt(depth)``, depth = attention layers x steps.

    The methods compute the same softmax-weighted sums over the same keys in another order (in pieces, or
    with extra keys of weight zero), so each attention output differs by rounding only: with random
    rounding, about sqrt(S) units of eps for a sum over S keys, at most 8 here (S <= 64 tokens). Each
    attention layer of each step adds its own difference, independent of the others, so they add in
    quadrature (sqrt(depth)); eps * max|reference| is one unit at the size of the values. 16 = 2 x 8
    leaves a factor 2 for the layers after attention. Measured: the largest drift is 4.3 such units
    (Qwen-Image, 4 entities, CFG, ComfyUI 0.3.64: 2.4e-5 against a tolerance of 9.0e-5); a wrong mask
    moves the images by more than 1e-3 (the dense images differ from plain sampling by more)."""
    diffusion_model = model.model.diffusion_model
    layers = sum(len(getattr(diffusion_model, name, ())) for name in ("double_blocks", "single_blocks",
                                                                        "transformer_blocks"))
    assert layers > 0, f"no attention layers found in {type(diffusion_model).__name__}"
    return 16 * torch.finfo(reference.dtype).eps * reference.abs().max().item() * (layers * steps) ** 0.5


def assert_same_up_to_rounding(actual, reference, model, method):
    tolerance = rounding_tolerance(reference, model)
    drift = (actual - reference).abs().max().item()
    assert drift <= tolerance, f"{method}: max difference {drift:.3g} from dense, rounding allows {tolerance:.3g}"


def sample(model, positive, negative, latent_shape, cfg, steps=STEPS, later_override=None):
    if later_override is not None:
        model = model.clone()
        model.model_options["transformer_options"]["optimized_attention_override"] = later_override
    noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(0))
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative,
                               torch.zeros(latent_shape), disable_pbar=True, seed=0)


SAMPLING_CASES = [
    # id, family, entities, latent (h, w), batch, cfg, on_negative, reference latent (h, w)
    ("flux-cfg-plain-negative", "flux", 3, (10, 14), 2, 3.0, False, None),
    ("flux-on-negative", "flux", 2, (9, 13), 1, 2.5, True, None),
    ("flux-reference", "flux", 2, (8, 12), 1, 1.0, False, (4, 6)),
    ("qwen-cfg-plain-negative", "qwen_image", 4, (12, 8), 2, 3.0, False, None),
    ("qwen-on-negative-reference", "qwen_image", 2, (8, 12), 1, 2.0, True, (6, 8)),
]


@pytest.mark.parametrize("case", SAMPLING_CASES, ids=[c[0] for c in SAMPLING_CASES])
def test_sampling_gives_the_dense_images(case):
    name, family, count, latent_hw, batch, cfg, on_negative, reference_hw = case
    base = FAMILIES[family]()
    positive, negative = prompts()
    if reference_hw is not None:
        frames = (1,) if family == "qwen_image" else ()
        reference = torch.randn((1, 16) + frames + reference_hw, generator=torch.Generator().manual_seed(5))
        positive[0][1]["reference_latents"] = [reference]
    h, w = latent_hw
    applied = conditioning.apply_entities(positive, entities(count, (8 * h, 8 * w), lengths=(3, 5, 2)), negative, on_negative=on_negative)
    shape = (batch, 16) + ((1,) if family == "qwen_image" else ()) + latent_hw
    dense = sample(patch.patch_model(base, attention="dense"), *applied, shape, cfg)
    plain = sample(base, positive, negative, shape, cfg)
    assert not torch.allclose(dense, plain, atol=1e-3)
    for method in FAST:
        assert_same_up_to_rounding(sample(patch.patch_model(base, attention=method), *applied, shape, cfg), dense,
                                   base, method)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_override_added_after_eligen_still_runs_on_every_piece(family):
    base = FAMILIES[family]()
    positive, negative = prompts()
    applied = conditioning.apply_entities(positive, entities(3, (64, 96), lengths=(3, 5, 2)), negative)
    shape = (1, 16) + ((1,) if family == "qwen_image" else ()) + (8, 12)
    recorder = Recorder()
    grouped = sample(patch.patch_model(base), *applied, shape, 2.0, later_override=recorder)  # auto: grouped
    dense = sample(patch.patch_model(base, attention="dense"), *applied, shape, 2.0)
    assert_same_up_to_rounding(grouped, dense, base, "grouped")
    augmented = sample(patch.patch_model(base, attention="augmented"), *applied, shape, 2.0, later_override=Recorder())
    assert_same_up_to_rounding(augmented, dense, base, "augmented")
    joint = 3 + 5 + 2 + 6 + 4 * 6
    assert recorder.calls and all(call["mask"] is None for call in recorder.calls)
    pieces = [call for call in recorder.calls if call["sequence"] < joint and call["sequence"] != 4 + 4 * 6]
    assert pieces  # the entity branch ran as pieces, each through the later override


@pytest.mark.parametrize("method", FAST)
def test_training_after_sampling_in_inference_mode_backpropagates(method):
    """Validation samples under inference mode; the plan and features built there must not reach the
    training step that follows (inference tensors cannot be saved for backward)."""
    model = patch.patch_model(tiny_flux(), attention=method)
    positive, negative = prompts()
    chosen = entities(3, (64, 96), lengths=(3, 5, 2))
    with torch.inference_mode():
        sample(model, *conditioning.apply_entities(positive, chosen, negative), (1, 16, 8, 12), 1.0, steps=1)
    x = torch.randn(1, 16, 8, 12, requires_grad=True)
    context = torch.randn(1, 3 + 5 + 2 + 6, TEXT_WIDTH)
    condition = conditioning.EntityCondition.for_training([3, 5, 2, 6], conditioning.stack_masks(chosen)[0][None])
    from comfyui_eligen.core import blocks

    adapter = adapter_for(model)
    options = host.models.sampling_transformer_options(model)
    options = blocks.training_transformer_options(model.model.diffusion_model, adapter.training_blocks, options, False)
    out = adapter.training_forward(model.model, x, torch.tensor([0.5]), context, torch.randn(1, TEXT_WIDTH), condition, options)
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_an_attention_function_with_another_layout_is_a_missing_capability(monkeypatch):
    """Where ComfyUI's attention function stops honouring skip_output_reshape, the start-up check names
    the contact point instead of the methods failing on shapes."""
    from comfyui_eligen.core import host

    def joined_only(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
        return comfy_attention.attention_basic(q, k, v, heads, mask=mask, skip_reshape=skip_reshape)

    monkeypatch.setattr(comfy_attention, "optimized_attention", joined_only)
    host.attention.check_attention_layouts.cache_clear()
    try:
        with pytest.raises(host.MissingCapability, match=r"expected \(1, 2, 3, 4\) and \(1, 3, 8\)"):
            host.attention.check_attention_layouts()
    finally:
        host.attention.check_attention_layouts.cache_clear()
    q = torch.zeros(1, 4, 8)
    with pytest.raises(host.MissingCapability, match="without v, heads"):
        host.attention.attention_call_arguments((q, q), {})
    with pytest.raises(host.MissingCapability, match="3 dimensions with skip_reshape=True"):
        host.attention.attention_call_arguments((q, q, q, 2), {"skip_reshape": True})
