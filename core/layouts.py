"""Entity layouts as users make them: a painted image of flat colours, or boxes written as text.

Both give one float mask ``[H, W]`` per entity plus its prompt; ``entities_from_layout`` turns them
into the ELIGEN_ENTITIES tuple with the same helpers as the EliGen Entity node.

Painted layouts, step by step (``painted_layout``):

1. Colours. A colour is a painted colour when enough of its pixels are *flat* (every 4-neighbour within
   ``FLAT_STEP`` of it): anti-aliased or resampled edges are thin, so their in-between colours have
   (almost) no flat pixels and never become entities, however long the edge. Near-identical flat colours
   (within ``MERGE_DISTANCE``, e.g. JPEG noise) count as one. Every pixel goes to the nearest colour.
2. Specks. Parts of a colour's patches thinner than 3 pixels (stray pixels, 1-2 pixel strokes, ragged
   edges) and whole patches smaller than the minimum area are specks: they take the colour around them
   (core/regions.py). A colour is an entity colour when one of its regions (a connected patch left after
   this) covers the minimum area; its mask is all of its regions. So specks never add pixels to a mask.
3. Pairing. Prompts pair with colours through a legend (every prompt line starts with its colour,
   ``#ff0000: ...`` or a name such as ``red: ...``) or else in *reading order*: each colour stands at the
   centre of its largest region; the topmost centre starts a row that holds every colour whose centre
   lies between that region's top and bottom rows, read left to right; then the next row, and so on.
   When moving any region by ``ORDER_TOLERANCE`` of the image would change that order (two centres side
   by side at nearly one height, a centre near a row's edge, two regions of one colour of nearly one
   size), the picture is ambiguous and the node asks for a legend instead of guessing.

The background is the colour covering the most pixels (``"largest"``), a given ``#rrggbb`` colour, or
nothing (``"none"``: every colour is an entity).
"""

import math
import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from . import conditioning as entity_conds
from .regions import fill_from_neighbours, region_map, solid_parts

FLAT_STEP = 8          # 0-255 units: a pixel is flat when no 4-neighbour differs by more in any channel
MERGE_DISTANCE = 40    # 0-255 RGB distance under which two flat colours are one painted colour
LEGEND_DISTANCE = 48   # how far a legend colour may be from the painted one it names
MAX_SEED_COLOURS = 4096
# Colours with this share of the image in flat pixels take part (so small painted patches keep their own
# colour until the speck rule removes them, rather than joining whichever colour is nearest in RGB).
CANDIDATE_SHARE = 0.001
MAX_CANDIDATES = 64
ORDER_TOLERANCE = 0.02  # of the image's longer side: moving a region this far must not change the order
SAME_SIZE = 0.8         # a colour's second region this close in area to its largest: either could lead
ALPHA_OPAQUE = 0.99     # alpha at or above this is opaque
VALUE_SLACK = 0.25      # resampling overshoot beyond 0..1 that is clamped (bicubic rings by a few %)
BACKGROUND_CHOICES = ("largest", "none")
# Colour names a legend may use, and the colour each stands for (a name matches the nearest painted one).
COLOUR_NAMES = {
    "red": (255, 0, 0), "orange": (255, 140, 0), "yellow": (255, 240, 0), "green": (0, 200, 0),
    "cyan": (0, 255, 255), "blue": (0, 0, 255), "purple": (140, 30, 170), "magenta": (255, 0, 255),
    "pink": (255, 160, 200), "brown": (140, 75, 20), "black": (0, 0, 0), "white": (255, 255, 255),
    "grey": (128, 128, 128), "gray": (128, 128, 128),
}
NAME_DISTANCE = 150     # a name matches no painted colour farther than this (0-255 RGB distance) ...
NAME_MARGIN = 1.25      # ... nor one with another painted colour less than this many times as far
_HEX = re.compile(r"#([0-9a-fA-F]{6})$")
_LEGEND = re.compile(r"\s*(#[0-9a-fA-F]{6}|[A-Za-z]+)\s*[:=]\s*(.*)$")


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
    """An IMAGE (``[1, H, W, C]`` or ``[H, W, C]``, floats in [0, 1], C = 3, or 4 when fully opaque)
    -> float ``[H, W, 3]`` in 0-255. Each other input gets its own message."""
    if image.ndim == 4:
        if image.shape[0] != 1:
            raise ValueError(f"the layout image batch holds {image.shape[0]} images; give one painted layout")
        image = image[0]
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"the layout image must be [H, W, 3] (RGB), got shape {list(image.shape)}")
    image = image.detach().float().cpu()
    bad = int((~torch.isfinite(image)).sum())
    if bad:
        raise ValueError(f"the layout image holds {bad} non-finite value(s) (NaN or infinity)")
    low, high = float(image.min()), float(image.max())
    if high > 1.0 + VALUE_SLACK and low >= 0.0 and high <= 255.0:
        raise ValueError(
            f"the layout image holds values up to {high:g}: it looks like 8-bit numbers (0 to 255), but a "
            f"ComfyUI IMAGE holds 0 to 1; the node that made it should divide by 255 (Load Image does)")
    if low < -VALUE_SLACK or high > 1.0 + VALUE_SLACK:
        raise ValueError(f"the layout image holds values from {low:g} to {high:g}; a ComfyUI IMAGE holds 0 to 1")
    if image.shape[-1] == 4:
        see_through = float((image[..., 3] < ALPHA_OPAQUE).float().mean())
        if see_through > 0:
            raise ValueError(
                f"the layout image has an alpha channel and {100 * see_through:.1f}% of its pixels are "
                f"transparent: the colour under a transparent pixel is not the one you see. Give the layout "
                f"without transparency (Load Image drops the alpha channel; or paint on an opaque background)")
    return (image[..., :3].clamp(0.0, 1.0) * 255.0).round()


def flat_pixels(pixels):
    """bool ``[H, W]``: no 4-neighbour differs by more than FLAT_STEP in any channel."""
    padded = F.pad(pixels.permute(2, 0, 1)[None], (1, 1, 1, 1), mode="replicate")[0].permute(1, 2, 0)
    centre = padded[1:-1, 1:-1]
    step = torch.zeros(pixels.shape[:2])
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        neighbour = padded[dy:dy + pixels.shape[0], dx:dx + pixels.shape[1]]
        step = torch.maximum(step, (centre - neighbour).abs().amax(-1))
    return step <= FLAT_STEP


def painted_colours(pixels):
    """``(colours float [K, 3], flat areas int [K])``: every group of flat colours (0-255, each the most
    common exact colour of its group), largest flat area first."""
    flat = pixels[flat_pixels(pixels)]
    if flat.shape[0] == 0:
        return torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64)
    flat = flat.to(torch.int64)
    packed, counts = torch.unique((flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2], return_counts=True)
    order = torch.argsort(counts, descending=True, stable=True)
    packed, counts = packed[order], counts[order]
    colours = torch.stack([packed >> 16, (packed >> 8) & 255, packed & 255], dim=1).float()
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
    order = sorted(range(len(seeds)), key=lambda i: -areas[i])
    return torch.stack([seeds[i] for i in order]), torch.tensor([areas[i] for i in order])


def assign_pixels(pixels, colours):
    """int64 ``[H, W]``: the index of the nearest colour for every pixel (edges included)."""
    distance = torch.cdist(pixels.reshape(-1, 3), colours)
    return distance.argmin(-1).reshape(pixels.shape[:2])


def despeckle(labels, count, min_pixels):
    """``(labels or None, largest)``: parts of regions thinner than 3 pixels and regions smaller than
    ``min_pixels`` take the colour around them (None: no region is that large); ``largest[k]`` is the
    area of colour k's largest region before that."""
    kept = torch.where(solid_parts(labels), labels + 1, 0)  # 0: the thin parts
    index, regions = region_map(kept)
    areas = torch.tensor([region.area for region in regions])
    owners = torch.tensor([region.label for region in regions])
    largest = torch.zeros(count + 1, dtype=torch.int64).scatter_reduce_(0, owners, areas, "amax")[1:]
    big = ((areas >= min_pixels) & (owners > 0))[index]
    if not bool(big.any()):
        return None, largest
    return fill_from_neighbours(torch.where(big, labels, -1), count), largest


def _share(pixels, total):
    return f"{100.0 * pixels / total:.1f}%"


def _largest_regions(labels, indices):
    """{colour index: its regions (Region), largest first} for the colours in ``indices``."""
    _, regions = region_map(labels)
    found = {}
    for region in sorted(regions, key=lambda r: (-r.area, r.top, r.centre_x)):
        if region.label in indices:
            found.setdefault(region.label, []).append(region)
    return found


def reading_order(places):
    """The keys of ``places`` ({key: Region}) in reading order: the topmost centre starts a row holding
    every place whose centre lies between that region's top and bottom rows, read left to right; then
    the next row from the topmost centre left, and so on."""
    remaining = sorted(places, key=lambda k: (places[k].centre_y, places[k].centre_x))
    order = []
    while remaining:
        lead = places[remaining[0]]
        row = sorted((k for k in remaining if lead.top <= places[k].centre_y <= lead.bottom),
                     key=lambda k: (places[k].centre_x, places[k].centre_y))
        order += row
        remaining = [k for k in remaining if k not in row]
    return order


def masks_in_reading_order(masks):
    """Indices of ``masks`` (bool ``[N, H, W]``, not overlapping) in the reading order a painting of them
    gets, each mask placed at its largest region as a painted colour is."""
    labels = torch.zeros(masks.shape[1:], dtype=torch.int64)
    for k, mask in enumerate(masks):
        labels[mask] = k + 1
    regions = _largest_regions(labels, range(1, len(masks) + 1))
    return [k - 1 for k in reading_order({k: found[0] for k, found in regions.items()})]


def _moved(region, dx, dy):
    return replace(region, centre_x=region.centre_x + dx, centre_y=region.centre_y + dy,
                   top=region.top + dy, bottom=region.bottom + dy)


def _first_swap(order, other):
    position = {key: i for i, key in enumerate(other)}
    for i, first in enumerate(order):
        for second in order[i + 1:]:
            if position[second] < position[first]:
                return first, second
    return order[0], order[-1]


def order_doubt(places, alternatives, tolerance, name):
    """None when the reading order of ``places`` is clear, else a sentence saying what makes it unclear:
    moving one region by ``tolerance`` pixels (along x or y) changes the order, or a colour's second
    region (``alternatives``: {key: Region} of nearly the same size) would lead to another order.
    ``name(key, region)`` names a place in the sentence."""
    order = reading_order(places)
    for key in order:
        for dx, dy in ((tolerance, 0), (-tolerance, 0), (0, tolerance), (0, -tolerance)):
            other = reading_order({**places, key: _moved(places[key], dx, dy)})
            if other != order:
                first, second = _first_swap(order, other)
                return (f"{name(first, places[first])} comes before {name(second, places[second])}, but moving "
                        f"one of them by {tolerance:.0f} px ({100 * ORDER_TOLERANCE:g}% of the image) would "
                        f"swap them")
    for key, second in alternatives.items():
        if reading_order({**places, key: second}) != order:
            return (f"{name(key, places[key])} is painted as regions of about the same size "
                    f"({places[key].area} and {second.area} pixels; the other one has its centre at "
                    f"x={second.centre_x:.0f}, y={second.centre_y:.0f}), so it has no single place in the order")
    return None


def colour_name(colour, colours):
    """The colour name a legend can use for ``colour`` (one of ``colours``), else its #rrggbb."""
    distances = {name: float(torch.linalg.vector_norm(colour - torch.tensor(rgb, dtype=torch.float32)))
                 for name, rgb in COLOUR_NAMES.items()}
    name = min(distances, key=distances.get)
    matched = _match_name(name, colours)
    return name if isinstance(matched, int) and torch.equal(colours[matched], colour) else hex_colour(colour)


def _match_name(name, colours):
    """The index in ``colours`` that colour name ``name`` stands for, or a sentence saying why none does."""
    wanted = torch.tensor(COLOUR_NAMES[name], dtype=torch.float32)
    distance = torch.linalg.vector_norm(colours - wanted, dim=-1)
    ranked = torch.argsort(distance).tolist()
    nearest = ranked[0]
    if float(distance[nearest]) > NAME_DISTANCE:
        return f"no painted colour is near {name} ({hex_colour(wanted)})"
    if len(ranked) > 1 and float(distance[ranked[1]]) < NAME_MARGIN * float(distance[nearest]):
        return (f"{name} could be {hex_colour(colours[nearest])} or {hex_colour(colours[ranked[1]])}; "
                f"write the colour as #rrggbb")
    return nearest


def _painted_hex(text, what, colours, present):
    """The colour of ``present`` nearest to ``text`` (#rrggbb), or None when none is within LEGEND_DISTANCE."""
    distance = torch.linalg.vector_norm(colours[present] - parse_hex(text, what), dim=-1)
    return present[int(distance.argmin())] if float(distance.min()) <= LEGEND_DISTANCE else None


def _legend_colour(text):
    """``(colour text, prompt)`` when a prompt line starts with a legend colour (#rrggbb or a name)."""
    match = _LEGEND.match(text)
    if match and (match.group(1).startswith("#") or match.group(1).lower() in COLOUR_NAMES):
        return match.group(1), match.group(2).strip()
    return None


@dataclass(frozen=True)
class _Painting:
    """What the pixels of a painted layout say, for pairing prompts and for messages."""
    colours: torch.Tensor   # [K, 3] 0-255: every candidate colour
    labels: torch.Tensor    # [H, W]: each pixel's colour after the speck rule
    present: list           # colours with a region of the minimum area (they keep pixels)
    entities: list          # present colours that are entities (the background taken out)
    largest: torch.Tensor   # [K]: area of each colour's largest region before the speck rule
    min_share: float

    def describe(self, indices):
        """'#dc1e1e (6.6%, centre x=30, y=23), ...' for colours that keep pixels."""
        regions = _largest_regions(self.labels, indices)
        total = self.labels.numel()
        return ", ".join(f"{hex_colour(self.colours[k])} ({_share(int((self.labels == k).sum()), total)}, centre "
                         f"x={regions[k][0].centre_x:.0f}, y={regions[k][0].centre_y:.0f})" for k in indices)

    def too_small(self):
        """'#aabbcc (0.3%), ...': the colours whose regions are all smaller than the minimum area."""
        total = self.labels.numel()
        return ", ".join(f"{hex_colour(self.colours[k])} ({_share(int(self.largest[k]), total)})"
                         for k in torch.argsort(self.largest, descending=True).tolist()[:8]
                         if k not in self.present and self.largest[k] > 0)

    def minimum(self):
        return f"min_area_percent ({100 * self.min_share:g}%)"


def painted_layout(image, prompts_text, background="largest", min_share=0.005):
    """A painted layout -> ``(masks float [N, H, W], prompts [N], colours [N] as #rrggbb)``; see the
    module docstring for the rules.

    ``prompts_text``: one prompt per line; either every line starts with its colour (``#rrggbb: prompt``
    or ``red: prompt``, a legend, in any order) or none does (reading order). ``background``: "largest",
    "none" or "#rrggbb"; ``min_share``: the minimum area of a region as a share of the image. Raises
    ValueError naming the colour, line or setting at fault.
    """
    pixels = layout_pixels(image)
    lines = prompt_lines(prompts_text)
    if not lines:
        raise ValueError("no entity prompts: write one prompt per line, one line per painted colour")
    if not 0.0 < min_share < 0.5:
        raise ValueError(f"the minimum colour share must be between 0 and 50 %, not {100 * min_share:g} %")
    height, width = pixels.shape[:2]
    total = height * width
    colours, flat_areas = painted_colours(pixels)
    if len(colours) == 0:
        raise ValueError("the layout image has no flat colour region; paint each entity in one flat colour")
    candidates = torch.nonzero(flat_areas >= min(min_share, CANDIDATE_SHARE) * total).view(-1)[:MAX_CANDIDATES]
    if len(candidates) == 0:
        raise ValueError(f"the layout image has no solid colour area: its most solid colour, {hex_colour(colours[0])}, "
                         f"has {_share(int(flat_areas[0]), total)} of the image in flat pixels; paint each entity "
                         f"in one flat colour")
    colours = colours[candidates]
    labels, largest = despeckle(assign_pixels(pixels, colours), len(colours), min_share * total)
    if labels is None:
        painting = _Painting(colours, torch.zeros(height, width, dtype=torch.int64), [], [], largest, min_share)
        raise ValueError(f"no colour has a region covering {painting.minimum()} of the image; the largest region "
                         f"of each colour: {painting.too_small()}; lower min_area_percent")
    areas = torch.bincount(labels.reshape(-1), minlength=len(colours))
    present = [k for k in range(len(colours)) if areas[k] > 0]
    painting = _Painting(colours, labels, present, present, largest, min_share)

    background = (background or "largest").strip()
    if background == "largest":
        painting = replace(painting, entities=[k for k in present if k != int(areas.argmax())])
    elif background != "none":
        found = _painted_hex(background, "background", colours, present)
        if found is None:
            raise ValueError(f"background colour {background.lower()} covers no pixel of the layout; the painted "
                             f"colours are {painting.describe(present)}")
        painting = replace(painting, entities=[k for k in present if k != found])
    if not painting.entities:
        background_colour = hex_colour(colours[present[0]])
        if painting.too_small():
            raise ValueError(
                f"only the background colour {background_colour} has a region covering {painting.minimum()} of "
                f"the image; the largest region of each other colour is smaller: {painting.too_small()}; lower "
                f"min_area_percent below the entities' size")
        raise ValueError(f"the layout holds one colour, {background_colour}, and it is the background; paint one "
                         f"flat colour per entity on it")

    legend = [(_legend_colour(text), number, text) for number, text in lines]
    with_colour = [entry for entry in legend if entry[0]]
    if with_colour and len(with_colour) != len(lines):
        number, text = next((n, t) for m, n, t in legend if not m)
        raise ValueError(
            f"line {number} ({text!r}) has no colour ('#rrggbb:' or a colour name such as 'red:') but other "
            f"lines do; either every prompt line starts with its colour (a legend) or none does (reading order)")
    if with_colour:
        order, prompts = _match_legend(with_colour, painting)
    else:
        order = _reading_order_of_colours(painting, lines)
        prompts = [text for _, text in lines]
    check_mask_memory(len(order), width, height, "the layout's size")
    masks = torch.stack([(labels == k).float() for k in order])
    return masks, prompts, [hex_colour(colours[k]) for k in order]


def _reading_order_of_colours(painting, lines):
    """The entity colours in reading order, or a ValueError when the count or the order is in doubt."""
    regions = _largest_regions(painting.labels, painting.entities)
    places = {k: found[0] for k, found in regions.items()}
    order = reading_order(places)
    if len(lines) != len(order):
        smaller = painting.too_small()
        raise ValueError(
            f"the layout has {len(order)} entity colours but {len(lines)} prompt lines; the colours in reading "
            f"order: {painting.describe(order)}"
            + (f"; smaller than {painting.minimum()}, so no entities: {smaller}" if smaller else ""))
    alternatives = {k: found[1] for k, found in regions.items()
                    if len(found) > 1 and found[1].area >= SAME_SIZE * found[0].area}
    tolerance = ORDER_TOLERANCE * max(painting.labels.shape)

    def name(k, region):
        return f"{hex_colour(painting.colours[k])} (centre x={region.centre_x:.0f}, y={region.centre_y:.0f})"

    doubt = order_doubt(places, alternatives, tolerance, name)
    if doubt:
        present = painting.colours[painting.present]
        example = "\n".join(f"{colour_name(painting.colours[k], present)}: {text}" for k, (_, text) in zip(order, lines))
        raise ValueError(
            f"the order of the colours is not clear from the picture: {doubt}. Pair the prompts with the "
            f"colours by a legend instead: start every prompt line with its colour, e.g. (this is the pairing "
            f"the reading order gives now)\n{example}")
    return order


def _match_legend(legend, painting):
    """(colour indices, prompts) in the legend's order; every entity colour must have exactly one line."""
    order, prompts, named = [], [], {}
    for (colour_text, prompt), number, _ in legend:
        if not prompt:
            raise ValueError(f"line {number}: colour {colour_text} has no prompt after the ':'")
        if colour_text.startswith("#"):
            nearest = _painted_hex(colour_text, f"line {number}", painting.colours, painting.present)
            if nearest is None:
                dropped = _painted_hex(colour_text, f"line {number}", painting.colours, range(len(painting.colours)))
                if dropped is not None and painting.largest[dropped] > 0:
                    raise ValueError(
                        f"line {number}: colour {colour_text} has no region covering {painting.minimum()} of the "
                        f"image (its largest: {_share(int(painting.largest[dropped]), painting.labels.numel())}), "
                        f"so it is no entity; lower min_area_percent")
                raise ValueError(f"line {number}: colour {colour_text} covers no pixel of the layout; the entity "
                                 f"colours are {painting.describe(painting.entities)}")
        else:
            matched = _match_name(colour_text.lower(), painting.colours[painting.present])
            if isinstance(matched, str):
                raise ValueError(f"line {number}: {matched}; the entity colours are "
                                 f"{painting.describe(painting.entities)}")
            nearest = painting.present[matched]
        if nearest not in painting.entities:
            raise ValueError(f"line {number}: colour {colour_text} is the background; choose another "
                             f"background or remove the line")
        if nearest in named:
            raise ValueError(f"line {number}: colour {colour_text} names the same painted colour as line "
                             f"{named[nearest]}")
        named[nearest] = number
        order.append(nearest)
        prompts.append(prompt)
    unnamed = [k for k in painting.entities if k not in named]
    if unnamed:
        raise ValueError(f"painted colours without a legend line: {painting.describe(unnamed)}; "
                         f"add a '#rrggbb: prompt' line for each")
    return order, prompts


# ---------------------------------------------------------------------------------------------
# Boxes as text

UNITS = ("auto", "pixels", "fractions")
_NUMBER_SPLIT = re.compile(r"[,\s]+")
# Plain decimal numbers only: ASCII digits, an optional sign, point and exponent. Python's float() also
# takes "1_0" and other scripts' digits, which a box written by hand never means.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?:nan|inf|infinity)",
                     re.IGNORECASE)
# All masks of one layout together, as float32: 16 masks at 4096x4096, four times the pixels of the largest
# images FLUX.1 and Qwen-Image make (EliGen Apply stacks the masks once more).
MAX_MASK_BYTES = 1 << 30


def check_mask_memory(count, width, height, what):
    """A ValueError before allocating ``count`` float masks of ``width`` x ``height`` past MAX_MASK_BYTES."""
    need = count * width * height * 4
    if need > MAX_MASK_BYTES:
        shrink = math.ceil(math.sqrt(need / MAX_MASK_BYTES))
        raise ValueError(
            f"{count} masks at {width}x{height} need {need / 2**30:.1f} GiB (one float mask per entity at {what}); "
            f"the limit is {MAX_MASK_BYTES / 2**30:g} GiB, e.g. 16 masks at 4096x4096. EliGen reads masks at the "
            f"latent size, so masks {shrink} times smaller on each side ({width // shrink}x{height // shrink}, "
            f"the same aspect) give the same result")


def parse_boxes(text, width, height, units="auto"):
    """``x, y, w, h`` per line -> ``(boxes, units)``: [(line number, line, (x0, y0, x1, y1) in pixels,
    clipped to the image)] and the units the numbers were read in.

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
        bad = next((part for part in parts if not _NUMBER.fullmatch(part)), None)
        if bad is not None:
            raise ValueError(f"line {number} ({line!r}): x, y, w, h must be numbers; {bad!r} is not a plain "
                             f"decimal number (digits 0-9, an optional sign, '.' and exponent, as in 12, 0.5, 1e2)")
        values = [float(p) for p in parts]
        if not all(math.isfinite(v) for v in values):
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
        boxes.append((number, line, (x0, y0, x1, y1)))
    return boxes, units


def box_masks(boxes, width, height):
    """float ``[N, H, W]``: 1 inside each box (``boxes`` as ``parse_boxes`` gives them)."""
    check_mask_memory(len(boxes), width, height, "the image size")
    masks = torch.zeros(len(boxes), height, width)
    for k, (_, _, (x0, y0, x1, y1)) in enumerate(boxes):
        masks[k, y0:y1, x0:x1] = 1.0
    return masks


def boxes_layout(boxes_text, prompts_text, width, height, units="auto"):
    """-> ``(masks float [N, H, W], prompts [N], reading)``; the counts of boxes and prompt lines must
    agree. ``reading`` says, line by line, which units the numbers were read in and the box in pixels."""
    boxes, used = parse_boxes(boxes_text, width, height, units)
    prompts = [text for _, text in prompt_lines(prompts_text)]
    if len(prompts) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(prompts)} prompt lines; write one prompt per box, "
                         f"in the same order")
    why = " (units auto: every number is at most 1)" if units == "auto" and used == "fractions" else ""
    reading = "\n".join(f"line {number} ({line}): read as {used}{why} -> x {x0}..{x1}, y {y0}..{y1} of "
                        f"{width}x{height} pixels" for number, line, (x0, y0, x1, y1) in boxes)
    return box_masks(boxes, width, height), prompts, reading


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
        embeds = entity_conds.encode_entity_text(clip, prompt, text_length, name)
        entity = entity_conds.Entity(embeds, entity_conds.entity_mask(mask, name), prompt)
        entities = entity_conds.add_entity(entities, entity)
    return entities
