"""The placement score as a picture: EliGen Placement Metric previews it on the node, where every
frontend draws node images (a node's preview text is drawn only for the frontend's own text node)."""

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WIDTH = 480
BACKGROUND = (24, 24, 28)
TEXT = (235, 235, 235)
DIM = (150, 150, 160)
TRACK = (60, 60, 70)
GOOD = (80, 190, 110)
WEAK = (220, 170, 60)
BAD = (215, 80, 70)


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1: one small bitmap font
        return ImageFont.load_default()


def _share_colour(value):
    return GOOD if value > 0.5 else WEAK if value > 0.25 else BAD


def _layout(width):
    """(padding, scale unit, top of the first row, row height, card height) for a card ``width`` wide."""
    pad, unit = width // 24, width / 480
    top, row_height = pad + round(34 * unit), round(62 * unit)
    return pad, unit, top, row_height, top + 2 * row_height + round(24 * unit) + pad


def card_height(width=WIDTH):
    return _layout(width)[4]


def score_card(summary, images=None, width=WIDTH):
    """uint8 [card_height(width), width, 3]: mean IoU and success rate as large numbers with bars, leak
    and missing below.

    summary: ``metric.summarise``'s dict; images: how many images were scored (shown when given).
    """
    pad, unit, top, row_height, height = _layout(width)
    card = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(card)
    entities = summary.get("entities", 0)
    scored = f"{entities} entities" + (f" in {images} images" if images is not None else "")
    draw.text((pad, pad), f"EliGen placement: {scored}", font=_font(round(18 * unit)), fill=DIM)
    if not entities or not math.isfinite(summary.get("mean_iou", math.nan)):
        draw.text((pad, height // 2), "no entities to score", font=_font(round(30 * unit)), fill=TEXT)
        return np.asarray(card)
    rows = (("mean IoU", summary["mean_iou"], f"{summary['mean_iou']:.3f}"),
            ("success (IoU > 0.5)", summary["success_rate"], f"{100 * summary['success_rate']:.0f}%"))
    for k, (label, value, text) in enumerate(rows):
        y = top + k * row_height
        draw.text((pad, y), text, font=_font(round(34 * unit)), fill=TEXT)
        draw.text((pad + round(150 * unit), y + round(4 * unit)), label, font=_font(round(18 * unit)), fill=DIM)
        bar_y = y + round(30 * unit)
        left, right = pad + round(150 * unit), width - pad
        draw.rectangle((left, bar_y, right, bar_y + round(10 * unit)), fill=TRACK)
        filled = left + round((right - left) * min(max(value, 0.0), 1.0))
        if filled > left:
            draw.rectangle((left, bar_y, filled, bar_y + round(10 * unit)), fill=_share_colour(value))
    leak = summary["mean_leak"]  # NaN when no entity's colour appears at all
    footer = f"leak {leak:.2f}" if math.isfinite(leak) else "leak n/a"
    footer += f"   missing {100 * summary['missing_rate']:.0f}%"
    draw.text((pad, top + 2 * row_height), footer, font=_font(round(18 * unit)), fill=DIM)
    return np.asarray(card)
