"""Synthetic entity dataset: 1-4 coloured shapes on a plain background, with a global caption and one
prompt and one mask per entity.

Every layout is a pure function of (split, seed, index): the train and held-out splits draw from
separate seed streams (numpy SeedSequence keyed by the split), so they never share a layout. These are
the training distribution (the lab's "easy" group); the lab's harder held-out groups (lab/groups.py)
draw from streams of their own (``layout_rng``'s ``stream``).
`write_dataset` writes the reference's metadata format (metadata.json + PNGs), which the dataset
node reads like any user dataset.
"""

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..core.conditioning import Entity as EntityCondition
from .files import save_png, write_json

# The toy world's image side: with the 8x VAE and 2x2 patches, 256 px is a 16x16 token grid, fine
# enough for a mask's tokens to show its shape. QUICK_SIZE (8x8 tokens, 4x cheaper to train) is what
# the test suite trains on. Layouts scale with the side: the same (split, seed, index) is the same
# drawing at every size.
SIZE = 256
QUICK_SIZE = 128

# Saturated colours, pairwise far apart (the metric assigns a pixel to the nearest one within reach).
PALETTE = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
# Backgrounds are greys: every palette colour is far from all of them.
BACKGROUNDS = {"grey": (128, 128, 128), "dark grey": (64, 64, 64), "light grey": (192, 192, 192)}
SHAPES = ("circle", "square", "triangle")
SPLITS = {"train": 1, "heldout": 2}  # seed-stream keys; the streams never overlap

RADIUS_RANGE = (0.12, 0.25)  # shape radius as a share of the image side
GAP = 2  # pixels between the bounding circles of two shapes


@dataclass
class Entity:
    colour: str
    shape: str
    centre: tuple  # (x, y) in pixels
    radius: float
    mask: np.ndarray  # bool [H, W]

    @property
    def prompt(self):
        return f"{self.colour} {self.shape}"


@dataclass
class Layout:
    image: np.ndarray  # uint8 [H, W, 3]
    caption: str
    background: str
    entities: list

    @property
    def masks(self):
        return np.stack([e.mask for e in self.entities]) if self.entities else np.zeros((0,) + self.image.shape[:2], bool)


SQUARE_HALF = 1.2 / np.sqrt(2)  # half side of a square of "radius" 1: a bit over inscribed, so areas are closer
EXTENT = {"circle": 1.0, "square": SQUARE_HALF * np.sqrt(2), "triangle": 1.0}  # farthest point from the centre


def shape_mask(shape, centre, radius, size=SIZE):
    """Pixels (by their centres) covered by a circle, an axis-aligned square or an upward triangle of
    the given "radius" around `centre` (EXTENT says how far each reaches)."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = x - centre[0], y - centre[1]
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        half = radius * SQUARE_HALF
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":
        # apex up at (0, -r), base at y = r/2 from -r*sqrt(3)/2 to +r*sqrt(3)/2
        base = dy <= radius / 2
        slope = np.sqrt(3)
        return base & (dy >= -radius + slope * np.abs(dx))
    raise ValueError(f"unknown shape {shape!r}; toy shapes are {SHAPES}")


def layout_rng(split, seed, index, stream=None):
    """The numpy generator of layout (split, seed, index); ``stream``: the key of another family of
    layouts drawn from the same (split, seed, index) (the lab's layout groups), None for these."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, not {split!r}")
    key = [SPLITS[split], int(seed), int(index)] + ([int(stream)] if stream is not None else [])
    return np.random.default_rng(np.random.SeedSequence(key))


def make_layout(split="train", seed=0, index=0, size=SIZE, max_entities=4):
    """One layout: 1..max_entities non-overlapping shapes in distinct colours."""
    rng = layout_rng(split, seed, index)
    count = int(rng.integers(1, max_entities + 1))
    colours = rng.choice(list(PALETTE), size=count, replace=False)
    background = str(rng.choice(list(BACKGROUNDS)))
    placed = []
    for colour in colours:
        shape = str(rng.choice(SHAPES))
        low, high = RADIUS_RANGE
        for attempt in range(200):
            if attempt and attempt % 50 == 0:
                high = max(low, high * 0.8)  # crowded: try smaller shapes
            radius = float(rng.uniform(low, high)) * size
            reach = radius * EXTENT[shape]
            centre = tuple(float(c) for c in rng.uniform(reach, size - reach, size=2))
            if all(np.hypot(centre[0] - p.centre[0], centre[1] - p.centre[1]) >= reach + p.radius * EXTENT[p.shape] + GAP
                   for p in placed):
                placed.append(Entity(str(colour), shape, centre, radius, shape_mask(shape, centre, radius, size)))
                break
    return render(placed, background, size)


def render(entities, background, size=SIZE):
    """The layout's image: the background, then each entity's mask in its colour (later ones on top)."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUNDS[background]
    for entity in entities:
        image[entity.mask] = PALETTE[entity.colour]
    return Layout(image, caption(entities, background), background, list(entities))


def caption(entities, background):
    """Global caption in the form "a red circle and a blue square on a grey background"."""
    names = [f"a {e.prompt}" for e in entities]
    things = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{things} on a {background} background"


def layouts(split="train", seed=0, count=1, start=0, size=SIZE):
    return [make_layout(split, seed, start + i, size) for i in range(count)]


def layout_entities(layout, encode):
    """The layout's entities as core.conditioning.Entity values; `encode(prompt) -> [1, L, D]`."""
    return tuple(EntityCondition(encode(e.prompt), torch.from_numpy(e.mask.astype("float32")), e.prompt)
                 for e in layout.entities)


def write_dataset(folder, count, seed=0, split="train", size=SIZE, make=make_layout):
    """Write `count` layouts (``make(split, seed, index, size)``: these layouts by default) as an EliGen
    dataset (reference metadata format) into `folder`.

    Layout: images/NNNNN.png, masks/NNNNN_K.png (white = entity), metadata.json. Returns the
    metadata path. Every file is written atomically; metadata.json last, so a folder with it is complete.
    """
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    os.makedirs(os.path.join(folder, "masks"), exist_ok=True)
    records = []
    for i in range(count):
        layout = make(split, seed, i, size)
        image_name = f"images/{i:05d}.png"
        save_png(layout.image, os.path.join(folder, image_name))
        mask_names = []
        for k, entity in enumerate(layout.entities):
            mask_name = f"masks/{i:05d}_{k}.png"
            save_png(entity.mask.astype(np.uint8) * 255, os.path.join(folder, mask_name))
            mask_names.append(mask_name)
        records.append({
            "image": image_name,
            "prompt": layout.caption,
            "eligen_entity_prompts": [e.prompt for e in layout.entities],
            "eligen_entity_masks": mask_names,
        })
    path = os.path.join(folder, "metadata.json")
    write_json(path, records)
    return path



# The toy training set that EliGen Toy Dataset writes into ComfyUI's input folder carries this file, so
# the node can tell its own folder (reuse it, or rewrite it for other settings) from a user's.
TOY_DATASET_MARKER = ".eligen_toy_dataset.json"


class ToyDatasetError(ValueError):
    """The toy dataset cannot go into the folder asked for; the message names the folder and why."""


def _read_marker(folder):
    try:
        with open(os.path.join(folder, TOY_DATASET_MARKER), encoding="utf-8") as f:
            marker = json.load(f)
        return marker if isinstance(marker, dict) else {}
    except (OSError, ValueError):
        return None


def _files_named_in(metadata_path):
    try:
        with open(metadata_path, encoding="utf-8") as f:
            records = json.load(f)
    except (OSError, ValueError):
        return set()
    names = set()
    for record in records if isinstance(records, list) else []:
        if isinstance(record, dict):
            names.add(record.get("image"))
            names.update(record.get("eligen_entity_masks") or [])
    return {name for name in names if isinstance(name, str)}


def ensure_dataset(folder, count, seed=0, size=SIZE):
    """The toy training set (``count`` train layouts of ``seed`` at ``size`` px) in ``folder``, written
    only when the folder does not already hold exactly that set. Returns True when it wrote the files.

    The folder must be new, empty or one this function wrote (its marker file says so): a user's folder
    is never written into. The marker is written first (incomplete) and completed after metadata.json,
    so an interrupted write is redone on the next call rather than taken for a user's folder. Files of
    an earlier toy set that the new one does not name are removed.
    """
    settings = {"count": int(count), "seed": int(seed), "size": int(size), "split": "train"}
    marker = _read_marker(folder)
    if marker is None and os.path.isdir(folder) and os.listdir(folder):
        raise ToyDatasetError(
            f"dataset folder {folder} already holds files that EliGen Toy Dataset did not write (no "
            f"{TOY_DATASET_MARKER}): choose another folder name; your files are left as they are")
    metadata = os.path.join(folder, "metadata.json")
    if marker == dict(settings, complete=True) and os.path.isfile(metadata):
        return False
    old_files = _files_named_in(metadata) if marker is not None else set()
    write_json(os.path.join(folder, TOY_DATASET_MARKER), dict(settings, complete=False))
    write_dataset(folder, count, seed=seed, split="train", size=size)
    for name in sorted(old_files - _files_named_in(metadata)):
        path = os.path.join(folder, name)
        if os.path.dirname(name) in ("images", "masks") and os.path.isfile(path):
            os.remove(path)
    write_json(os.path.join(folder, TOY_DATASET_MARKER), dict(settings, complete=True))
    return True
