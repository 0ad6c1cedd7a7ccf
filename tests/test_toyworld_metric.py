"""The placement metric's references (token-fill bound, ground-truth ceiling), its rule for entities that
share a colour, and its layout-level intervals (plain functions, no server)."""

import numpy as np
import pytest

from comfyui_eligen.toyworld import data, evaluate, metric, models


def token_region(mask, pool=8, patch=2):
    """Pixels of the tokens the reference rule gives a 128 px mask, computed here from its definition:
    nearest resize to the latent samples the pixel at the centre of each pool x pool block; a token is in
    when any of its patch x patch latent pixels is."""
    latent = mask[pool // 2::pool, pool // 2::pool]
    rows, cols = latent.shape[0] // patch, latent.shape[1] // patch
    tokens = latent.reshape(rows, patch, cols, patch).any(axis=(1, 3))
    return np.kron(tokens, np.ones((pool * patch, pool * patch), bool)).astype(bool)


def test_token_fill_image_scores_exactly_the_iou_of_the_masks_token_region():
    checked = 0
    for index in range(30):
        layout = data.make_layout("heldout", 4, index, data.QUICK_SIZE)
        regions = [token_region(e.mask) for e in layout.entities]
        if len(regions) > 1 and np.sum(regions, axis=0).max() > 1:
            continue  # a token shared by two masks is given to one of them: checked below
        prompts = [e.prompt for e in layout.entities]
        fill = metric.token_fill_image(layout.masks, prompts, (16, 16), 2)
        for result, entity, region in zip(metric.score_image(fill, layout.masks, prompts), layout.entities, regions):
            assert result["iou"] == pytest.approx((entity.mask & region).sum() / (entity.mask | region).sum())
            assert result["leak"] == pytest.approx((region & ~entity.mask).sum() / region.sum())
        checked += 1
    assert checked >= 10


def test_a_token_two_masks_reach_goes_to_the_one_covering_more_of_it():
    masks = np.zeros((2, 32, 32), bool)
    masks[0, 4:12, 4:12] = True   # first token: entity 0 covers 64 of its 256 pixels
    masks[1, 10:16, 8:16] = True  # entity 1 covers 48 of them; 8 pixels of entity 1 lie under entity 0
    masks[1, 16:28, 0:16] = True  # and fills most of the token below
    fill = metric.token_fill_image(masks, ["red square", "blue square"], (4, 4), 2)
    assert (fill[:16, :16] == data.PALETTE["red"]).all()
    assert (fill[16:, :16] == data.PALETTE["blue"]).all()
    assert (fill[:, 16:] == (128, 128, 128)).all()
    with pytest.raises(ValueError, match="do not divide"):
        metric.token_fill_image(masks, ["red square", "blue square"], (5, 5), 2)


def test_references_through_the_toy_vae_and_the_models_token_grid():
    model, clip, vae = models.load_toy_models("flux", "random")
    layouts = data.layouts("heldout", 2, 4, size=data.QUICK_SIZE)
    assert evaluate.token_grid(model, vae, 128, 128) == (16, 16, 2)
    references = evaluate.score_references(model, vae, layouts)
    for i, layout in enumerate(layouts):
        # the toy VAE is an 8x average pool, decoded by nearest upsampling
        pooled = layout.image.astype(np.float64).reshape(16, 8, 16, 8, 3).mean(axis=(1, 3)) / 255.0
        truth = np.kron(pooled, np.ones((8, 8, 1)))
        prompts = [e.prompt for e in layout.entities]
        expected = metric.score_image(truth, layout.masks, prompts)
        assert [r["iou"] for r in references["truth"]["images"][i]] == pytest.approx([r["iou"] for r in expected])
        fill = metric.token_fill_image(layout.masks, prompts, (16, 16), 2, data.BACKGROUNDS[layout.background])
        expected = metric.score_image(fill, layout.masks, prompts)
        assert [r["iou"] for r in references["fill"]["images"][i]] == [r["iou"] for r in expected]
    truth, fill = references["truth"]["summary"], references["fill"]["summary"]
    assert 0.6 < truth["mean_iou"] < 1.0 and fill["mean_iou"] < truth["mean_iou"]


def same_colour_pair():
    big = data.shape_mask("square", (34, 34), 26, 128)
    small = data.shape_mask("circle", (104, 104), 12, 128)
    return np.stack([big, small]), ["red square", "red circle"]


def draw(masks, colour="red"):
    image = np.full((128, 128, 3), 128, np.uint8)
    for mask in masks:
        image[mask] = data.PALETTE[colour]
    return image


def test_entities_of_one_colour_are_told_apart_by_their_masks():
    masks, prompts = same_colour_pair()
    exact = metric.score_image(draw(masks), masks, prompts)
    assert [r["iou"] for r in exact] == [1.0, 1.0]  # by colour alone each would score about 0.5 or less

    # The two shapes swapped between the two places: both entities fail.
    swapped_small = data.shape_mask("circle", (34, 34), 12, 128)
    swapped_big = data.shape_mask("square", (104, 104), 26, 128)
    swapped = metric.score_image(draw([swapped_small, swapped_big]), masks, prompts)
    assert not any(r["success"] for r in swapped)
    assert swapped[0]["iou"] == pytest.approx(swapped_small.sum() / masks[0].sum())

    # Only the first drawn: the second is missing, the first is exact.
    one = metric.score_image(draw(masks[:1]), masks, prompts)
    assert one[0]["iou"] == 1.0 and one[1]["missing"] and one[1]["iou"] == 0.0

    # Colour outside both masks counts for the nearest mask: a blob beside the circle is its leak.
    blob = np.zeros_like(masks[0])
    blob[100:108, 118:126] = True
    spill = metric.score_image(draw([masks[0], masks[1], blob]), masks, prompts)
    assert spill[0]["iou"] == 1.0 and spill[0]["leak"] == 0.0
    assert spill[1]["leak"] == pytest.approx(blob.sum() / (blob.sum() + masks[1].sum()))


def test_distinct_colours_score_as_before():
    layout = next(l for l in (data.make_layout("heldout", 0, i) for i in range(50)) if len(l.entities) == 3)
    image = np.roll(layout.image, 9, axis=0)
    colours = metric.colour_map(image)
    for result, entity in zip(metric.score_image(image, layout.masks, [e.prompt for e in layout.entities]),
                              layout.entities):
        here = colours == list(data.PALETTE).index(entity.colour)
        assert result["iou"] == pytest.approx((here & entity.mask).sum() / (here | entity.mask).sum())


def entity(iou):
    return {"iou": iou, "leak": 0.0, "success": iou > 0.5, "missing": False}


def test_bootstrap_intervals_are_seeded_and_cover_the_layouts():
    run = [[entity(0.9), entity(0.7)], [entity(0.1)], [entity(0.6)], [entity(0.3), entity(0.2)]]
    first = metric.bootstrap_intervals([run], samples=500, seed=3)
    assert first == metric.bootstrap_intervals([run], samples=500, seed=3)
    mean = np.mean([r["iou"] for layout in run for r in layout])
    low, high = first["mean_iou"]
    assert 0.1 <= low < mean < high <= 0.9
    # identical layouts: no spread; more layouts of the same kind: a narrower interval
    same = metric.bootstrap_intervals([[[entity(0.4)]] * 8], samples=200)
    assert same["mean_iou"] == [pytest.approx(0.4), pytest.approx(0.4)] and same["success_rate"] == [0.0, 0.0]
    wide = metric.bootstrap_intervals([run], samples=2000)["mean_iou"]
    narrow = metric.bootstrap_intervals([run * 16], samples=2000)["mean_iou"]
    assert narrow[1] - narrow[0] < 0.5 * (wide[1] - wide[0])
    # two seeds pool their entities per layout
    pooled = metric.bootstrap_intervals([[[entity(1.0)]], [[entity(0.0)]]], samples=50)
    assert pooled["mean_iou"] == [0.5, 0.5]
    with pytest.raises(ValueError, match="different numbers of layouts"):
        metric.bootstrap_intervals([run, run[:2]])


@pytest.mark.parametrize("pool", [8, 4])
def test_16x16_tokens_raise_the_references(pool):
    """The world's 256 px with the 8x VAE, or 128 px with a 4x toy VAE: 16x16 tokens either way, and both
    references rise well above the 8x8 grid's (128 px, 8x VAE) on the same layouts."""
    size = data.SIZE if pool == 8 else data.QUICK_SIZE
    layouts = data.layouts("heldout", 2, 6, size=size)
    coarse_model, _, coarse_vae = models.load_toy_models("flux", "random")
    fine_model, _, fine_vae = models.load_toy_models("flux", "random", pool=pool)
    assert evaluate.token_grid(fine_model, fine_vae, size, size) == (32, 32, 2)  # 16x16 tokens
    coarse = evaluate.score_references(coarse_model, coarse_vae, data.layouts("heldout", 2, 6, size=data.QUICK_SIZE))
    fine = evaluate.score_references(fine_model, fine_vae, layouts)
    for name in evaluate.REFERENCES:
        assert fine[name]["summary"]["mean_iou"] > coarse[name]["summary"]["mean_iou"] + 0.05
    layout = next(l for l in (data.make_layout("heldout", 2, i, size) for i in range(40)) if len(l.entities) == 1)
    fill = metric.token_fill_image(layout.masks, [e.prompt for e in layout.entities], (32, 32), 2)
    painted = np.all(fill == data.PALETTE[layout.entities[0].colour], axis=-1)
    assert np.array_equal(painted, token_region(layout.entities[0].mask, pool=pool))
