"""Layout groups: "easy" is the training distribution (toyworld/data.py); the others are held-out
layouts harder than it (GROUPS describes each), only for evaluation.

Every generator takes the layout's own numpy Generator (data.layout_rng keyed by split, seed, index and
the group's stream), so a layout is a pure function of (group, split, seed, index). A draw that cannot
meet the group's promise (say, six shapes that do not fit) is redrawn from the same generator.

    .venv/bin/python scripts/toyworld.py dataset FOLDER [--count N --split heldout --group small --size 128]
writes a dataset of any group in the reference format (the `dataset` command).
"""

import argparse

import numpy as np
import torch

from ..core.attention import mask_to_token_grid
from ..toyworld import data
from ..toyworld.data import BACKGROUNDS, EXTENT, GAP, PALETTE, RADIUS_RANGE, SHAPES, SIZE, Entity, render, shape_mask
from .cli import add_size_argument

GROUPS = {
    "easy": "1-4 separate shapes in distinct colours, radius 12-25% of the side",
    "many": "5-6 separate shapes in distinct colours, radius 8-15% of the side",
    "same_colour": "2-3 separate shapes of one colour, each a different shape",
    "small": "2-4 separate shapes in distinct colours, each mask on 2-4 tokens of an 8x8 grid (the side / 8)",
    "tiny": "2-4 separate shapes in distinct colours, each mask on 2-4 image tokens (16 px with the 8x VAE)",
    "touching": "2-4 shapes in distinct colours, each touching or overlapping an earlier one (drawn on top)",
    "border": "1-4 shapes in distinct colours, the first cut by the image border (25-75% visible)",
}
# Seed-stream keys of the held-out groups; "easy" keeps the training stream (the figures measured on it
# stay valid).
STREAMS = {"many": 101, "same_colour": 102, "small": 103, "touching": 104, "border": 105, "tiny": 106}

SMALL_TOKENS = (2, 4)  # tokens a small (or tiny) entity's mask covers
TOKEN_PIXELS = 16  # one image token with the 8x VAE and 2x2 patches, in pixels
SMALL_GRID = 8  # "small" counts tokens of an 8x8 grid at every image side: the same shapes at every size
BORDER_VISIBLE = (0.25, 0.75)  # share of a cut entity that stays inside the image
MAX_OVERLAP = 0.4  # touching group: at most this share of either mask lies under the other
REDRAWS = 100


def token_count(mask, token_pixels=TOKEN_PIXELS):
    """Tokens of a grid of `token_pixels`-px tokens that the package's mask rule
    (core.attention.mask_to_token_grid) marks for this mask: nearest resize to the latent, then any
    pixel per 2x2 patch."""
    latent = (mask.shape[0] * 2 // token_pixels, mask.shape[1] * 2 // token_pixels)
    return int(mask_to_token_grid(torch.from_numpy(mask.astype(np.float32)), latent).sum())


def _inside_centre(rng, reach, size):
    return tuple(float(c) for c in rng.uniform(reach, size - reach, size=2))


def _separate(centre, reach, placed):
    return all(np.hypot(centre[0] - p.centre[0], centre[1] - p.centre[1]) >= reach + p.radius * EXTENT[p.shape] + GAP
               for p in placed)


def _place_separate(rng, colours, shapes, radius_range, size, placed=None, accept=None, attempts=200):
    """Non-overlapping shapes inside the image, as data.make_layout places them."""
    placed = list(placed or [])
    for colour, shape in zip(colours, shapes):
        for _ in range(attempts):
            radius = float(rng.uniform(*radius_range)) * size
            reach = radius * EXTENT[shape]
            centre = _inside_centre(rng, reach, size)
            if _separate(centre, reach, placed):
                entity = Entity(str(colour), str(shape), centre, radius, shape_mask(shape, centre, radius, size))
                if accept is None or accept(entity):
                    placed.append(entity)
                    break
    return placed


def _many(rng, size):
    count = int(rng.integers(5, 7))
    colours = rng.choice(list(PALETTE), size=count, replace=False)
    shapes = rng.choice(SHAPES, size=count)
    placed = _place_separate(rng, colours, shapes, (0.08, 0.15), size)
    return placed if len(placed) == count else None


def _same_colour(rng, size):
    count = int(rng.integers(2, 4))
    colour = str(rng.choice(list(PALETTE)))
    shapes = rng.choice(SHAPES, size=count, replace=False)
    placed = _place_separate(rng, [colour] * count, shapes, RADIUS_RANGE, size)
    return placed if len(placed) == count else None


def _small_shapes(rng, size, radius_range, token_pixels):
    count = int(rng.integers(2, 5))
    colours = rng.choice(list(PALETTE), size=count, replace=False)
    shapes = rng.choice(SHAPES, size=count)
    low, high = SMALL_TOKENS
    placed = _place_separate(rng, colours, shapes, radius_range, size,
                             accept=lambda entity: low <= token_count(entity.mask, token_pixels) <= high)
    return placed if len(placed) == count else None


def _small(rng, size):
    """2-4 tokens of an 8x8 grid: at 128 px the image's own tokens; at 256 px the same shapes (8-16 tokens)."""
    return _small_shapes(rng, size, (0.04, 0.11), size // SMALL_GRID)


def _tiny(rng, size):
    """2-4 of the image's own tokens at any side (at 128 px the same rule as small)."""
    # the radii small uses at 128 px, in pixels: shapes that cover 2-4 tokens of 16 px
    scale = TOKEN_PIXELS * SMALL_GRID / size
    return _small_shapes(rng, size, (0.04 * scale, 0.11 * scale), TOKEN_PIXELS)


def _touches(mask, others):
    """True when the mask shares or borders (4-neighbour) a pixel of `others`."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return bool((grown & others).any())


def _touching(rng, size):
    count = int(rng.integers(2, 5))
    colours = rng.choice(list(PALETTE), size=count, replace=False)
    placed = []
    for colour in colours:
        for _ in range(200):
            shape = str(rng.choice(SHAPES))
            radius = float(rng.uniform(*RADIUS_RANGE)) * size * 0.8
            reach = radius * EXTENT[shape]
            if placed:
                anchor = placed[int(rng.integers(len(placed)))]
                angle = rng.uniform(0, 2 * np.pi)
                distance = (reach + anchor.radius * EXTENT[anchor.shape]) * rng.uniform(0.55, 0.95)
                centre = (anchor.centre[0] + distance * np.cos(angle), anchor.centre[1] + distance * np.sin(angle))
                if not all(reach <= c <= size - reach for c in centre):
                    continue
            else:
                centre = _inside_centre(rng, reach, size)
            mask = shape_mask(shape, centre, radius, size)
            if placed:
                if not _touches(mask, np.any([p.mask for p in placed], axis=0)):
                    continue
                if any((mask & p.mask).sum() > MAX_OVERLAP * min(mask.sum(), p.mask.sum()) for p in placed):
                    continue
            placed.append(Entity(str(colour), shape, (float(centre[0]), float(centre[1])), radius, mask))
            break
    return placed if len(placed) == count else None


def _border(rng, size):
    count = int(rng.integers(1, 5))
    colours = rng.choice(list(PALETTE), size=count, replace=False)
    shapes = rng.choice(SHAPES, size=count)
    cut = None
    for _ in range(200):
        radius = float(rng.uniform(*RADIUS_RANGE)) * size
        reach = radius * EXTENT[str(shapes[0])]
        edge = int(rng.integers(4))  # left, right, top, bottom
        across = float(rng.uniform(-0.6, 0.6)) * reach  # centre this far inside (+) or outside (-) the edge
        along = float(rng.uniform(reach, size - reach))
        offset = across if edge in (0, 2) else size - across
        centre = (offset, along) if edge < 2 else (along, offset)
        mask = shape_mask(str(shapes[0]), centre, radius, size)
        full = shape_mask(str(shapes[0]), (size / 2, size / 2), radius, size).sum()
        if BORDER_VISIBLE[0] <= mask.sum() / full <= BORDER_VISIBLE[1]:
            cut = Entity(str(colours[0]), str(shapes[0]), centre, radius, mask)
            break
    if cut is None:
        return None
    placed = _place_separate(rng, colours[1:], shapes[1:], RADIUS_RANGE, size, placed=[cut])
    return placed if len(placed) == count else None


GENERATORS = {"many": _many, "same_colour": _same_colour, "small": _small, "touching": _touching,
              "border": _border, "tiny": _tiny}


def make_layout(split="train", seed=0, index=0, size=SIZE, group="easy"):
    """One layout of `group` (GROUPS)."""
    if group not in GROUPS:
        raise ValueError(f"layout group must be one of {sorted(GROUPS)}, not {group!r}")
    if group == "easy":
        return data.make_layout(split, seed, index, size)
    rng = data.layout_rng(split, seed, index, STREAMS[group])
    for _ in range(REDRAWS):
        placed = GENERATORS[group](rng, size)
        if placed:
            background = str(rng.choice(list(BACKGROUNDS)))
            return render(placed, background, size)
    raise RuntimeError(f"layout group {group!r}: no layout met the group's rule in {REDRAWS} draws")


def layouts(split="train", seed=0, count=1, start=0, size=SIZE, group="easy"):
    return [make_layout(split, seed, start + i, size, group) for i in range(count)]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write a synthetic EliGen toy dataset (reference metadata format).")
    parser.add_argument("folder")
    parser.add_argument("--count", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=sorted(data.SPLITS), default="train")
    parser.add_argument("--group", choices=list(GROUPS), default="easy",
                        help="layout group: " + "; ".join(f"{k}: {v}" for k, v in GROUPS.items()))
    add_size_argument(parser)
    args = parser.parse_args(argv)
    path = data.write_dataset(args.folder, args.count, args.seed, args.split, args.size,
                              make=lambda split, seed, index, size: make_layout(split, seed, index, size, args.group))
    print(f"wrote {args.count} {args.split} layouts ({args.group}) to {path}")
