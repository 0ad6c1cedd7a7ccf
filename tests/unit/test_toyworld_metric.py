"""The placement metric's rule for entities that share a colour, and that distinct colours score by
colour alone (plain functions, no server)."""

import numpy as np
import pytest

from comfyui_eligen.toyworld import data, metric


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
