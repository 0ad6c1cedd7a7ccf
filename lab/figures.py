"""Demo figures drawn with PIL alone: a contact sheet of generated images with the masks outlined."""

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
