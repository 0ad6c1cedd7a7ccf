"""The placement score as the picture EliGen Placement Metric shows on its node: the bars follow the
figures, and a run with nothing to score says so instead of drawing numbers."""

import math

import numpy as np

from comfyui_eligen.toyworld import score_card


def summary(iou, success, leak=0.1, missing=0.0, entities=10):
    return {"entities": entities, "mean_iou": iou, "success_rate": success, "mean_leak": leak,
            "missing_rate": missing}


def pixels_of(card, colour):
    return int(np.all(card == np.array(colour, np.uint8), axis=-1).sum())


def test_card_is_an_rgb_picture_of_the_documented_size():
    card = score_card.score_card(summary(0.7, 1.0), images=4)
    assert card.dtype == np.uint8 and card.shape == (score_card.card_height(), score_card.WIDTH, 3)
    assert len(np.unique(card.reshape(-1, 3), axis=0)) > 10  # text drawn, not a flat box


def test_bars_grow_with_the_figures_and_take_their_colour_from_them():
    good = score_card.score_card(summary(0.9, 0.9))
    better = score_card.score_card(summary(1.0, 1.0))
    assert 0 < pixels_of(good, score_card.GOOD) < pixels_of(better, score_card.GOOD)
    poor = score_card.score_card(summary(0.1, 0.0))
    assert pixels_of(poor, score_card.GOOD) == 0 and pixels_of(poor, score_card.BAD) > 0


def test_nothing_to_score_draws_no_bars():
    empty = {"entities": 0, "mean_iou": math.nan, "success_rate": math.nan, "mean_leak": math.nan,
             "missing_rate": math.nan}
    card = score_card.score_card(empty, images=0)
    for colour in (score_card.GOOD, score_card.WEAK, score_card.BAD, score_card.TRACK):
        assert pixels_of(card, colour) == 0


def test_unknown_leak_is_drawn_without_failing():
    card = score_card.score_card(summary(0.5, 0.5, leak=math.nan))
    assert card.shape[1] == score_card.WIDTH
