"""The lab's references for the placement metric: the token-fill bound (exactly the tokens the mask
rule gives each mask) and the ground-truth ceiling through the toy VAE (plain functions, no server)."""

import numpy as np
import pytest

from comfyui_eligen.lab import evaluate
from comfyui_eligen.toyworld import data, metric, models


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
        fill = evaluate.token_fill_image(layout.masks, prompts, (16, 16), 2)
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
    fill = evaluate.token_fill_image(masks, ["red square", "blue square"], (4, 4), 2)
    assert (fill[:16, :16] == data.PALETTE["red"]).all()
    assert (fill[16:, :16] == data.PALETTE["blue"]).all()
    assert (fill[:, 16:] == (128, 128, 128)).all()
    with pytest.raises(ValueError, match="do not divide"):
        evaluate.token_fill_image(masks, ["red square", "blue square"], (5, 5), 2)


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
        fill = evaluate.token_fill_image(layout.masks, prompts, (16, 16), 2, data.BACKGROUNDS[layout.background])
        expected = metric.score_image(fill, layout.masks, prompts)
        assert [r["iou"] for r in references["fill"]["images"][i]] == [r["iou"] for r in expected]
    truth, fill = references["truth"]["summary"], references["fill"]["summary"]
    assert 0.6 < truth["mean_iou"] < 1.0 and fill["mean_iou"] < truth["mean_iou"]


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
    fill = evaluate.token_fill_image(layout.masks, [e.prompt for e in layout.entities], (32, 32), 2)
    painted = np.all(fill == data.PALETTE[layout.entities[0].colour], axis=-1)
    assert np.array_equal(painted, token_region(layout.entities[0].mask, pool=pool))
