"""The attention mask EliGen really hands to attention, against the reference rule.

The mask is captured during a real sampling step (comfy.sample.sample on a tiny FLUX.1 / Qwen-Image)
by an attention override installed on the model before EliGen; EliGen's own override chains it, so the
recorder sees exactly what the attention function receives. It is compared with
- an independent, loop-by-loop re-implementation of the reference rule (PIL nearest resize, half
  threshold, 2x2 "any pixel" patches, the segment rules), for every case; and
- the reference's own ``construct_mask`` from diffsynth==2.1.12 (installed by scripts/setup.sh without
  its dependencies; tests/diffsynth_reference.py loads only its flux_dit module; the test fails when it
  is missing), where the case fits its assumptions (equal segment lengths, even latent sizes).
"""

import numpy as np
import pytest
import torch
from PIL import Image

import comfy.sample
from comfyui_eligen.core import attention, conditioning, patch
from diffsynth_reference import flux_dit_reference
from tiny_models import TEXT_WIDTH, tiny_flux, tiny_qwen_image


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
