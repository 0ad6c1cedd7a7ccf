"""The one mask rule against PIL itself, on the functions the package really uses.

Sampling reads masks through ``adapter.image_token_masks`` -> ``attention.mask_to_token_grid``, training
through ``dataset.resize_mask`` (to the training size) and then the same sampling path; both resize with
``mask_rule.resize_nearest``. PIL's nearest resize is separable (each output cell reads the source row
of its row and the source column of its column), so comparing the row and column index vectors
compares every cell; part of the comparison goes through whole 2-D PIL images anyway.
"""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_eligen.core import conditioning, mask_rule, patch
from comfyui_eligen.core.adapters.flux import FluxAdapter
from comfyui_eligen.training import dataset
from tiny_models import TEXT_WIDTH

SEED = 20251128


def pil_indices(source, target):
    """The source pixel PIL reads for each of ``target`` outputs: a 1-row int32 image of 0..source-1."""
    row = Image.fromarray(np.arange(source, dtype=np.int32)[None, :])
    return np.asarray(row.resize((target, 1), Image.NEAREST))[0].astype(np.int64)


def pil_token_grid(mask_u8, latent_hw, patch_size=2):
    """The reference, written out: PIL NEAREST to the latent, > half, any pixel of a patch."""
    h, w = latent_hw
    inside = np.asarray(Image.fromarray(mask_u8).resize((w, h), Image.NEAREST)) > 127.5
    padded = np.zeros((-(-h // patch_size) * patch_size, -(-w // patch_size) * patch_size), dtype=bool)
    padded[:h, :w] = inside
    return padded.reshape(padded.shape[0] // patch_size, patch_size, -1, patch_size).any(axis=(1, 3))


def tie_prone_sides(rng, latent_side):
    """Mask sides whose nearest positions land exactly on a pixel border for some output pixel:
    (i + 1/2) * S / T is an integer when S * (2i + 1) is a multiple of 2T."""
    sides = [latent_side * k // 2 for k in (1, 3, 5) if latent_side * k // 2 >= 1]
    odd = 2 * rng.randint(0, max(0, latent_side - 1) // 2) + 1
    sides += [2 * latent_side * m // odd for m in range(1, 4) if (2 * latent_side * m) % odd == 0]
    return sides


def random_pairs(count, seed=SEED):
    """(mask (H, W), image (H, W)) pairs: image-sized, scaled, tie-prone and upsampled masks."""
    rng = random.Random(seed)
    pairs = [((200, 300), (344, 512)), ((442, 1157), (442, 1157))]  # sizes where rounding once went wrong
    while len(pairs) < count:
        image = (rng.randint(16, 2048), rng.randint(16, 2048))
        latent = (image[0] // 8, image[1] // 8)
        kind = rng.choice(["image", "scaled", "tie", "small"])
        if kind == "image":
            mask = image
        elif kind == "scaled":
            scale = rng.uniform(0.3, 2.5)
            mask = (max(1, round(image[0] * scale)), max(1, round(image[1] * scale)))
        elif kind == "small":  # drawn smaller than the latent: nearest upsampling
            mask = (max(1, latent[0] // 2 + rng.randint(0, 3)), max(1, latent[1] // 2 + rng.randint(0, 3)))
        else:
            side = rng.choice(tie_prone_sides(rng, latent[0]))
            mask = (side, max(1, round(side * image[1] / image[0])))
        if mask_rule.aspect_problem(mask, latent) is None or kind == "image":
            pairs.append((mask, image))
    return pairs


PAIRS = random_pairs(2400)


def test_pil_index_rule_on_every_side_of_the_random_pairs_and_the_size_sweep():
    sides = {(m[0], i[0] // 8) for m, i in PAIRS} | {(m[1], i[1] // 8) for m, i in PAIRS}
    sides |= {(s, s // 8) for s in range(256, 2049, 8)}
    differing = [pair for pair in sorted(sides) if not np.array_equal(mask_rule.nearest_indices(*pair), pil_indices(*pair))]
    assert differing == []
    assert len(sides) > 3000


def test_every_image_size_from_256_to_2048_takes_an_image_sized_mask():
    sizes = range(256, 2049, 8)
    refused = [(h, w) for h in sizes for w in sizes if mask_rule.aspect_problem((h, w), (h // 8, w // 8))]
    assert refused == [] and len(sizes) ** 2 == 50625
    # ... and through the model patch's own check, for the portrait sizes the issue lists.
    for h, w in [(1024, 504), (1024, 472), (768, 344)]:
        condition = conditioning.EntityCondition.for_training([2, 3], torch.ones(1, 1, h, w))
        patch.check_mask_aspect(condition, (h // 8, w // 8))


def test_the_sampling_token_grid_is_pil_on_real_mask_images():
    rng = np.random.default_rng(SEED)
    adapter = FluxAdapter()
    cells = 0
    for mask_hw, image_hw in PAIRS[:200]:
        latent_hw = (image_hw[0] // 8, image_hw[1] // 8)
        mask_u8 = rng.integers(0, 256, size=mask_hw, dtype=np.uint8)
        masks = torch.from_numpy(mask_u8).float()[None, None] / 255.0   # [B, N, H, W] as EntityCondition holds
        x = torch.zeros(1, 16, *latent_hw)
        ours = adapter.image_token_masks(masks, x)[0, 0].numpy()
        expected = pil_token_grid(mask_u8, latent_hw).reshape(-1)
        assert np.array_equal(ours, expected), (mask_hw, image_hw)
        cells += expected.size
    assert cells > 100_000


def test_two_dimensional_pil_resize_equals_the_index_vectors():
    """Separability, measured: each cell of a real 2-D PIL resize reads (row index, column index)."""
    for mask_hw, image_hw in PAIRS[:300]:
        mask_hw = (min(mask_hw[0], 1024), min(mask_hw[1], 1024))
        latent_hw = (image_hw[0] // 8, image_hw[1] // 8)
        code = np.arange(mask_hw[0] * mask_hw[1], dtype=np.int32).reshape(mask_hw)
        read = np.asarray(Image.fromarray(code).resize((latent_hw[1], latent_hw[0]), Image.NEAREST))
        ours = mask_rule.resize_nearest(code, latent_hw)
        assert np.array_equal(read, ours), (mask_hw, latent_hw)


def test_training_masks_use_the_same_rule_as_pil():
    rng = np.random.default_rng(SEED + 1)
    for mask_hw, image_hw in PAIRS[:150]:
        mask = rng.random(mask_hw) > 0.5
        bucket = dataset.target_size(*mask_hw, max_pixels=512 * 512)
        if 0 in bucket:
            continue
        (sw, sh), box = dataset._cover_and_crop_box(mask_hw[0], mask_hw[1], bucket)
        pil = Image.fromarray(mask.astype(np.uint8) * 255)
        expected = np.asarray(pil.resize((sw, sh), Image.NEAREST).crop(box)) > 127
        assert np.array_equal(dataset.resize_mask(mask, bucket), expected), (mask_hw, bucket)


def test_torch_nearest_exact_differs_where_pil_and_we_agree():
    """A 300x200 mask to a 64x43 latent; PIL reads row 99 at output 21."""
    assert pil_indices(200, 43)[21] == 99 and mask_rule.nearest_indices(200, 43)[21] == 99
    rows = torch.nn.functional.interpolate(torch.arange(200.0)[None, None, :, None], size=(43, 1),
                                           mode="nearest-exact")[0, 0, :, 0]
    assert int(rows[21]) == 100


def test_masks_of_different_sizes_are_each_resized_once():
    """An 88x80 image, masks 92x84 and 42x38; the strip of the second covers 3 tokens."""
    big = torch.zeros(84, 92)
    big[10:30, 10:40] = 1.0
    strip = torch.zeros(38, 42)
    strip[19:36, 36:39] = 1.0
    entities = (conditioning.Entity(torch.zeros(1, 2, TEXT_WIDTH), big, "big"),
                conditioning.Entity(torch.zeros(1, 2, TEXT_WIDTH), strip, "strip"))
    positive = [[torch.zeros(1, 3, TEXT_WIDTH), {}]]
    applied, _ = conditioning.apply_entities(positive, entities)
    condition = applied[0][1]["model_conds"]["eligen"]
    assert condition.sizes() == ((84, 92), (38, 42))
    latent_hw = (10, 11)
    x = torch.zeros(1, 16, *latent_hw)
    tokens = FluxAdapter().image_token_masks(condition.masks, x, mask_sizes=condition.mask_sizes)[0]
    for k, mask in enumerate((big, strip)):
        expected = pil_token_grid((mask.numpy() * 255).astype(np.uint8), latent_hw).reshape(-1)
        assert np.array_equal(tokens[k].numpy(), expected)
    assert int(tokens[1].sum()) == 3
    patch.check_mask_aspect(condition, latent_hw)  # both fit the latent


def test_aspect_message_names_eligen_the_entities_the_pixel_size_and_the_range_that_fits():
    condition = conditioning.EntityCondition(torch.ones(1, 2, 64, 64), [2, 2, 3], labels=("a", "b"))
    with pytest.raises(ValueError) as error:
        patch.check_mask_aspect(condition, (8, 16), latent_scale=8)
    assert str(error.value) == (
        'EliGen Apply: the entity masks do not fit the image being sampled: entity 1 ("a"), entity 2 ("b"): '
        "mask is 64x64 (aspect 1.000) but the image being sampled is 128x64 pixels (its latent is 16x8; aspect "
        "2.000; masks of aspect 1.600 to 2.250 fit it); draw the masks at the image's aspect ratio, or sample "
        "an image (latent size) of the masks' aspect")
    with pytest.raises(ValueError, match=r"but the latent is 16x8 \(aspect 2.000; masks of aspect 1.600 to 2.250"):
        patch.check_mask_aspect(condition, (8, 16))


def test_preview_refuses_what_sampling_refuses():
    from comfyui_eligen.nodes import preview

    image = torch.zeros(1, 64, 128, 3)
    with pytest.raises(ValueError, match=r'entity 1 \("wide"\) \(previewed on a 128x64 image\): mask is 64x64'):
        preview.overlay_entities(image, [torch.ones(64, 64)], ["wide"])
    preview.overlay_entities(image, [torch.ones(32, 64)], ["fits"])
