"""Entity layouts as users make them: a painted image of flat colours, or boxes written as text.

Both give one float mask ``[H, W]`` per entity plus its prompt; ``entities_from_layout`` turns them
into the ELIGEN_ENTITIES tuple with the same helpers as the EliGen Entity node.

Painted layouts. A colour is an entity colour when enough of its pixels are *flat* (every 4-neighbour
within ``FLAT_STEP`` of it): anti-aliased or resampled edges are thin, so their in-between colours have
(almost) no flat pixels and never become entities, however long the edge. Near-identical flat colours
(within ``MERGE_DISTANCE``, e.g. JPEG noise) count as one. Every pixel, edges included, then belongs to
the nearest entity colour. Prompts pair with colours either through a legend (every prompt line starts
with ``#rrggbb:``) or, without one, in the order each colour first appears in raster order (top row
first, left to right). The background is the colour covering the most pixels (``"largest"``), a given
``#rrggbb`` colour, or nothing (``"none"``: every colour is an entity).
"""

import re

import torch
import torch.nn.functional as F

from . import conditioning as entity_conds

FLAT_STEP = 8          # 0-255 units: a pixel is flat when no 4-neighbour differs by more in any channel
MERGE_DISTANCE = 40    # 0-255 RGB distance under which two flat colours are one painted colour
LEGEND_DISTANCE = 48   # how far a legend colour may be from the painted one it names
MAX_SEED_COLOURS = 4096
BACKGROUND_CHOICES = ("largest", "none")
_HEX = re.compile(r"#([0-9a-fA-F]{6})$")
_LEGEND = re.compile(r"\s*(#[0-9a-fA-F]{6})\s*[:=]\s*(.*)$")


def hex_colour(rgb):
    return "#%02x%02x%02x" % tuple(int(c) for c in rgb)


def parse_hex(text, what):
    match = _HEX.match(text.strip())
    if not match:
        raise ValueError(f"{what}: {text.strip()!r} is not a colour; write it as #rrggbb (e.g. #ff0000)")
    value = int(match.group(1), 16)
    return torch.tensor([(value >> 16) & 255, (value >> 8) & 255, value & 255], dtype=torch.float32)


def prompt_lines(text):
    """[(line number, text)] of the non-empty lines (numbers count every line, from 1, as editors do)."""
    return [(number, line.strip()) for number, line in enumerate((text or "").splitlines(), start=1)
            if line.strip()]


# ---------------------------------------------------------------------------------------------
# Painted layouts

def layout_pixels(image):
    """An IMAGE (``[1, H, W, C]`` or ``[H, W, C]``, floats in [0, 1]) -> float ``[H, W, 3]`` in 0-255."""
    if image.ndim == 4:
        if image.shape[0] != 1:
            raise ValueError(f"the layout image batch holds {image.shape[0]} images; give one painted layout")
        image = image[0]
    if image.ndim != 3 or image.shape[-1] < 3:
        raise ValueError(f"the layout image must be [H, W, 3], got shape {list(image.shape)}")
    image = image[..., :3].detach().float().cpu()
    if not bool(torch.isfinite(image).all()):
        raise ValueError("the layout image holds non-finite values (NaN or infinity)")
    return (image.clamp(0.0, 1.0) * 255.0).round()


def flat_pixels(pixels):
    """bool ``[H, W]``: no 4-neighbour differs by more than FLAT_STEP in any channel."""
    padded = F.pad(pixels.permute(2, 0, 1)[None], (1, 1, 1, 1), mode="replicate")[0].permute(1, 2, 0)
    centre = padded[1:-1, 1:-1]
    step = torch.zeros(pixels.shape[:2])
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        neighbour = padded[dy:dy + pixels.shape[0], dx:dx + pixels.shape[1]]
        step = torch.maximum(step, (centre - neighbour).abs().amax(-1))
    return step <= FLAT_STEP


def painted_colours(pixels, min_share=0.005):
    """The painted colours: float ``[K, 3]`` (0-255, each the most common exact colour of its group),
    sorted by flat area, largest first. A colour needs ``min_share`` of the image in flat pixels."""
    height, width, _ = pixels.shape
    flat = pixels[flat_pixels(pixels)]
    if flat.shape[0] == 0:
        return torch.zeros(0, 3)
    colours, counts = torch.unique(flat.to(torch.int64), dim=0, return_counts=True)
    order = torch.argsort(counts, descending=True)
    colours, counts = colours[order].float(), counts[order]
    # Greedy grouping, most common first: a colour joins the first seed within MERGE_DISTANCE.
    seeds, areas = [], []
    for colour, count in zip(colours[:MAX_SEED_COLOURS], counts[:MAX_SEED_COLOURS].tolist()):
        if seeds:
            distance = torch.linalg.vector_norm(torch.stack(seeds) - colour, dim=-1)
            nearest = int(distance.argmin())
            if float(distance[nearest]) <= MERGE_DISTANCE:
                areas[nearest] += count
                continue
        seeds.append(colour)
        areas.append(count)
    keep = [i for i, area in enumerate(areas) if area >= min_share * height * width]
    keep.sort(key=lambda i: -areas[i])
    return torch.stack([seeds[i] for i in keep]) if keep else torch.zeros(0, 3)


def assign_pixels(pixels, colours):
    """int64 ``[H, W]``: the index of the nearest colour for every pixel (edges included)."""
    distance = torch.cdist(pixels.reshape(-1, 3), colours)
    return distance.argmin(-1).reshape(pixels.shape[:2])


def first_appearance(labels, count):
    """For each colour index, the raster position (row * W + column) of its first pixel (-1 if none)."""
    flat = labels.reshape(-1)
    positions = torch.full((count,), -1, dtype=torch.int64)
    for k in range(count):
        hits = torch.nonzero(flat == k)
        if hits.numel():
            positions[k] = hits[0, 0]
    return positions


def _describe_colours(colours, labels, indices):
    total = labels.numel()
    width = labels.shape[1]
    first = first_appearance(labels, len(colours))
    parts = []
    for k in indices:
        share = 100.0 * float((labels == k).sum()) / total
        y, x = divmod(int(first[k]), width)
        parts.append(f"{hex_colour(colours[k])} ({share:.1f}%, first at x={x}, y={y})")
    return ", ".join(parts)


def painted_layout(image, prompts_text, background="largest", min_share=0.005):
    """A painted layout -> ``(masks float [N, H, W], prompts [N], colours [N] as #rrggbb)``.

    ``prompts_text``: one prompt per line; either every line is ``#rrggbb: prompt`` (a legend, in any
    order) or none is (prompts pair with colours in order of first appearance in raster order).
    ``background``: "largest", "none" or "#rrggbb". Raises ValueError naming the colour or line.
    """
    pixels = layout_pixels(image)
    lines = prompt_lines(prompts_text)
    if not lines:
        raise ValueError("no entity prompts: write one prompt per line, one line per painted colour")
    if not 0.0 < min_share < 0.5:
        raise ValueError(f"the minimum colour share must be between 0 and 50 %, not {100 * min_share:g} %")
    colours = painted_colours(pixels, min_share)
    if len(colours) == 0:
        raise ValueError("the layout image has no flat colour region; paint each entity in one flat colour")
    labels = assign_pixels(pixels, colours)
    entity_indices = list(range(len(colours)))

    background = (background or "largest").strip()
    if background == "largest":
        areas = torch.bincount(labels.reshape(-1), minlength=len(colours))
        entity_indices.remove(int(areas.argmax()))
    elif background != "none":
        wanted = parse_hex(background, "background")
        distance = torch.linalg.vector_norm(colours - wanted, dim=-1)
        nearest = int(distance.argmin())
        if float(distance[nearest]) > LEGEND_DISTANCE:
            raise ValueError(
                f"background colour {hex_colour(wanted)} covers no pixel of the layout; the painted colours "
                f"are {_describe_colours(colours, labels, range(len(colours)))}")
        entity_indices.remove(nearest)
    if not entity_indices:
        raise ValueError("the layout holds only the background colour; paint one flat colour per entity")

    legend = [(_LEGEND.match(text), number, text) for number, text in lines]
    with_colour = [entry for entry in legend if entry[0]]
    if with_colour and len(with_colour) != len(lines):
        number, text = next((n, t) for m, n, t in legend if not m)
        raise ValueError(
            f"line {number} ({text!r}) has no '#rrggbb:' colour but other lines do; either every prompt "
            f"line starts with its colour (a legend) or none does (order of first appearance)")
    if with_colour:
        order, prompts = _match_legend(with_colour, colours, labels, entity_indices)
    else:
        if len(lines) != len(entity_indices):
            raise ValueError(
                f"the layout has {len(entity_indices)} entity colours but {len(lines)} prompt lines; the "
                f"colours in order of first appearance: "
                f"{_describe_colours(colours, labels, _by_appearance(labels, entity_indices))}"
                f"{'' if background == 'none' else f' (background: {background})'}")
        order = _by_appearance(labels, entity_indices)
        prompts = [text for _, text in lines]
    masks = torch.stack([(labels == k).float() for k in order])
    return masks, prompts, [hex_colour(colours[k]) for k in order]


def _by_appearance(labels, indices):
    first = first_appearance(labels, int(labels.max()) + 1)
    return sorted(indices, key=lambda k: int(first[k]))


def _match_legend(legend, colours, labels, entity_indices):
    order, prompts, named = [], [], {}
    for match, number, _ in legend:
        wanted = parse_hex(match.group(1), f"line {number}")
        prompt = match.group(2).strip()
        if not prompt:
            raise ValueError(f"line {number}: colour {match.group(1)} has no prompt after the ':'")
        distance = torch.linalg.vector_norm(colours - wanted, dim=-1)
        nearest = int(distance.argmin())
        if float(distance[nearest]) <= LEGEND_DISTANCE and nearest not in entity_indices:
            raise ValueError(f"line {number}: colour {match.group(1)} is the background; choose another "
                             f"background or remove the line")
        if float(distance[nearest]) > LEGEND_DISTANCE:
            raise ValueError(
                f"line {number}: colour {match.group(1)} covers no pixel of the layout; the entity colours "
                f"are {_describe_colours(colours, labels, entity_indices)}")
        if nearest in named:
            raise ValueError(f"line {number}: colour {match.group(1)} names the same painted colour as line "
                             f"{named[nearest]}")
        named[nearest] = number
        order.append(nearest)
        prompts.append(prompt)
    unnamed = [k for k in entity_indices if k not in named]
    if unnamed:
        raise ValueError(f"painted colours without a legend line: {_describe_colours(colours, labels, unnamed)}; "
                         f"add a '#rrggbb: prompt' line for each")
    return order, prompts


# ---------------------------------------------------------------------------------------------
# Boxes as text

UNITS = ("auto", "pixels", "fractions")
_NUMBER_SPLIT = re.compile(r"[,\s]+")


def parse_boxes(text, width, height, units="auto"):
    """``x, y, w, h`` per line -> [(line number, (x0, y0, x1, y1) in pixels, clipped to the image)].

    units: "pixels", "fractions" (of the image width and height) or "auto": fractions when every number
    of every line is at most 1, pixels when every line has a bigger one (a mix is refused). Empty lines
    are skipped; errors name the line.
    """
    if units not in UNITS:
        raise ValueError(f"units must be one of {', '.join(UNITS)}, not {units!r}")
    if width < 1 or height < 1:
        raise ValueError(f"the image size must be positive, not {width}x{height}")
    rows = []
    for number, line in prompt_lines(text):
        parts = [p for p in _NUMBER_SPLIT.split(line) if p]
        if len(parts) != 4:
            raise ValueError(f"line {number} ({line!r}): expected 4 numbers x, y, w, h; got {len(parts)}")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"line {number} ({line!r}): x, y, w, h must be numbers") from None
        if not all(v == v and abs(v) != float("inf") for v in values):
            raise ValueError(f"line {number} ({line!r}): x, y, w, h must be finite numbers")
        if values[2] <= 0 or values[3] <= 0:
            raise ValueError(f"line {number} ({line!r}): the width and height must be positive")
        rows.append((number, line, values))
    if not rows:
        raise ValueError("no boxes: write one 'x, y, w, h' line per entity")
    if units == "auto":
        small = [(number, line) for number, line, values in rows if all(abs(v) <= 1.0 for v in values)]
        if small and len(small) < len(rows):
            big = next((number, line) for number, line, values in rows if (number, line) not in small)
            raise ValueError(f"line {small[0][0]} ({small[0][1]!r}) reads as fractions (every number at most 1) "
                             f"but line {big[0]} ({big[1]!r}) as pixels; write all lines one way or set units")
        units = "fractions" if small else "pixels"
    boxes = []
    for number, line, (x, y, w, h) in rows:
        if units == "fractions":
            x, w = x * width, w * width
            y, h = y * height, h * height
        x0, y0 = max(0, round(x)), max(0, round(y))
        x1, y1 = min(width, max(round(x + w), round(x) + 1)), min(height, max(round(y + h), round(y) + 1))
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"line {number} ({line!r}): the box lies outside the {width}x{height} image "
                             f"(read as {units})")
        boxes.append((number, (x0, y0, x1, y1)))
    return boxes


def box_masks(boxes, width, height):
    """float ``[N, H, W]``: 1 inside each box."""
    masks = torch.zeros(len(boxes), height, width)
    for k, (_, (x0, y0, x1, y1)) in enumerate(boxes):
        masks[k, y0:y1, x0:x1] = 1.0
    return masks


def boxes_layout(boxes_text, prompts_text, width, height, units="auto"):
    """-> ``(masks float [N, H, W], prompts [N])``; the counts of boxes and prompt lines must agree."""
    boxes = parse_boxes(boxes_text, width, height, units)
    prompts = [text for _, text in prompt_lines(prompts_text)]
    if len(prompts) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(prompts)} prompt lines; write one prompt per box, "
                         f"in the same order")
    return box_masks(boxes, width, height), prompts


# ---------------------------------------------------------------------------------------------
# Entities

def entities_from_layout(masks, prompts, clip, text_length="padded_512", previous=None):
    """ELIGEN_ENTITIES for masks ``[N, H, W]`` and their prompts, appended to ``previous``."""
    if len(masks) != len(prompts):
        raise ValueError(f"{len(masks)} masks but {len(prompts)} prompts")
    if clip is None:
        raise ValueError("connect a clip (the model's text encoder) to encode the entity prompts")
    entities = tuple(previous or ())
    for mask, prompt in zip(masks, prompts):
        name = entity_conds.describe(len(entities), prompt)
        embeds = entity_conds.encode_entity_text(clip, prompt, text_length)
        entity = entity_conds.Entity(embeds, entity_conds.entity_mask(mask, name), prompt)
        entities = entity_conds.add_entity(entities, entity)
    return entities
