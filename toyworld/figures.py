"""Demo figures drawn with PIL alone: a contact sheet with mask outlines, and a loss graph."""

import numpy as np
from PIL import Image, ImageDraw

LABEL_WIDTH = 150
HEADER = 18
PAD = 4


def outline(mask):
    """bool [H, W]: the mask's pixels that touch a pixel outside it."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def with_outlines(image, masks):
    """uint8 [H, W, 3] with each mask's border drawn white on a black halo."""
    image = np.array(image, dtype=np.uint8, copy=True)
    for mask in masks:
        border = outline(np.asarray(mask) > 0.5)
        halo = outline(np.pad(border, 1)[:-2, 1:-1] | np.pad(border, 1)[2:, 1:-1] | border) & ~border
        image[halo] = (0, 0, 0)
        image[border] = (255, 255, 255)
    return image


def to_uint8(image):
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return image


def contact_sheet(rows, masks, column_titles=None):
    """rows: [(label, [image per column])]; masks: per column a list of masks drawn on every row.
    Returns a PIL image: one row per condition, one column per layout."""
    columns = len(masks)
    height, width = to_uint8(rows[0][1][0]).shape[:2]
    sheet = Image.new("RGB", (LABEL_WIDTH + columns * (width + PAD), HEADER + len(rows) * (height + PAD)), "white")
    draw = ImageDraw.Draw(sheet)
    for c in range(columns):
        title = column_titles[c] if column_titles else f"layout {c}"
        draw.text((LABEL_WIDTH + c * (width + PAD) + 2, 3), title, fill="black")
    for r, (label, images) in enumerate(rows):
        top = HEADER + r * (height + PAD)
        for i, line in enumerate(_wrap(label, 22)):
            draw.text((4, top + 4 + 12 * i), line, fill="black")
        for c, image in enumerate(images):
            tile = with_outlines(to_uint8(image), masks[c])
            sheet.paste(Image.fromarray(tile), (LABEL_WIDTH + c * (width + PAD), top))
    return sheet


def _wrap(text, width):
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def loss_graph(losses, title="EliGen LoRA training loss", size=(640, 360), smooth=10):
    """losses: [(step, loss)]. A line chart (raw in grey, moving average in blue) as a PIL image."""
    steps = np.array([s for s, _ in losses], dtype=float)
    values = np.array([v for _, v in losses], dtype=float)
    kernel = max(1, min(smooth, len(values)))
    averaged = np.convolve(values, np.ones(kernel) / kernel, mode="valid")
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, size[0] - 20, 30, size[1] - 40
    low, high = float(values.min()), float(values.max())
    if high - low < 1e-12:
        high = low + 1.0
    x_of = lambda s: left + (s - steps[0]) / max(1e-9, steps[-1] - steps[0]) * (right - left)
    y_of = lambda v: bottom - (v - low) / (high - low) * (bottom - top)
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 8), title, fill="black")
    for fraction in (0.0, 0.5, 1.0):
        value = low + fraction * (high - low)
        draw.text((4, y_of(value) - 6), f"{value:.3f}", fill="black")
        step = steps[0] + fraction * (steps[-1] - steps[0])
        draw.text((x_of(step) - 10, bottom + 6), f"{step:.0f}", fill="black")
    draw.text(((left + right) // 2 - 15, bottom + 22), "step", fill="black")
    draw.line([(x_of(s), y_of(v)) for s, v in zip(steps, values)], fill=(180, 180, 180), width=1)
    if len(averaged) > 1:
        draw.line([(x_of(s), y_of(v)) for s, v in zip(steps[kernel - 1:], averaged)], fill=(30, 80, 200), width=2)
    return image
