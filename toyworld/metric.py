"""Placement metric: did each entity land in its mask?

Each pixel of a generated image is given the nearest palette colour if it lies within
`COLOUR_RADIUS` of it (L2 in [-1, 1] RGB), else no colour (background, blends). For an entity of
colour c with mask m, where c appears is compared with m:

- iou: |colour c AND m| / |colour c OR m|
- leak: share of the colour-c pixels that lie outside m (NaN when the colour is absent)
- success: iou > 0.5
- missing: colour c covers less than 10% of the mask's area anywhere in the image

An entity's colour is the palette word in its prompt ("red circle" -> red). Entities that share a
colour are told apart by their masks (`owned_pixels`): a pixel of that colour counts for every one of
them whose mask contains it, and a pixel outside all their masks counts for the one whose mask is
nearest (Euclidean distance to the mask; ties go to the earlier entity). With distinct colours this is
exactly "where colour c appears".

The lab scores its references with the same rule (lab/evaluate.py: the token-fill bound and the
ground-truth ceiling) and adds layout-level intervals (lab/compare.py).
"""

import argparse
import json
import math
import os
import re

import numpy as np
from PIL import Image

from .data import PALETTE
from .files import write_json

COLOUR_RADIUS = 1.0
SUCCESS_IOU = 0.5
MISSING_SHARE = 0.1

_PALETTE_NAMES = list(PALETTE)
_PALETTE_SIGNED = np.array([PALETTE[name] for name in _PALETTE_NAMES], np.float32) / 127.5 - 1.0


def colour_of(prompt):
    """The palette colour named in an entity prompt; ValueError if none or several."""
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    found = [name for name in _PALETTE_NAMES if name in words]
    if len(found) != 1:
        raise ValueError(
            f"entity {prompt!r}: the placement metric needs exactly one palette colour "
            f"({', '.join(_PALETTE_NAMES)}) in the prompt, found {found or 'none'}")
    return found[0]


def colour_map(image):
    """image float [H, W, 3] in [0, 1] (or uint8) -> int [H, W]: palette index, or -1 for no colour."""
    image = np.asarray(image)
    signed = image.astype(np.float32) / 127.5 - 1.0 if image.dtype == np.uint8 else image.astype(np.float32) * 2.0 - 1.0
    distances = np.linalg.norm(signed[:, :, None, :] - _PALETTE_SIGNED[None, None], axis=-1)
    nearest = distances.argmin(axis=-1)
    return np.where(distances.min(axis=-1) <= COLOUR_RADIUS, nearest, -1)


def _resize_mask(mask, shape):
    mask = np.asarray(mask, dtype=np.float32)
    if mask.shape == tuple(shape):
        return mask > 0.5
    resized = Image.fromarray((mask * 255).astype(np.uint8)).resize((shape[1], shape[0]), Image.NEAREST)
    return np.asarray(resized) > 127


def owned_pixels(colours, masks, entity_colours):
    """Bool [H, W] per entity: the pixels of its colour credited to it (the rule in the module text).
    colours: colour_map of the image; masks: bool [N, H, W] at the image's resolution."""
    from scipy.ndimage import distance_transform_edt

    owned = [None] * len(entity_colours)
    for colour in dict.fromkeys(entity_colours):
        members = [i for i, c in enumerate(entity_colours) if c == colour]
        here = colours == _PALETTE_NAMES.index(colour)
        if len(members) == 1:
            owned[members[0]] = here
            continue
        inside = np.stack([masks[i] for i in members])
        distance = np.stack([distance_transform_edt(~mask) if mask.any() else np.full(mask.shape, np.inf)
                             for mask in inside])
        nearest = distance.argmin(axis=0)
        outside = ~inside.any(axis=0)
        for k, i in enumerate(members):
            owned[i] = here & (inside[k] | (outside & (nearest == k)))
    return owned


def score_pixels(here, mask):
    """Figures for one entity from the pixels credited to it (bool [H, W]) and its mask (bool [H, W])."""
    union = np.logical_or(here, mask).sum()
    inside = np.logical_and(here, mask).sum()
    iou = float(inside / union) if union else 0.0
    leak = float((here.sum() - inside) / here.sum()) if here.any() else math.nan
    return {
        "iou": iou,
        "leak": leak,
        "success": iou > SUCCESS_IOU,
        "missing": bool(here.sum() < MISSING_SHARE * max(1, mask.sum())),
    }


def score_image(image, masks, prompts):
    """Per-entity figures for one image: masks [N, H, W] (any resolution), prompts N strings."""
    if len(masks) != len(prompts):
        raise ValueError(f"{len(masks)} masks but {len(prompts)} entity prompts")
    colours = colour_map(image)
    masks = [_resize_mask(mask, colours.shape) for mask in masks]
    owned = owned_pixels(colours, masks, [colour_of(prompt) for prompt in prompts])
    return [{"entity": index, "prompt": prompt, **score_pixels(here, mask)}
            for index, (here, mask, prompt) in enumerate(zip(owned, masks, prompts))]


def summarise(entity_results):
    """Mean IoU, success rate, mean leak (over entities whose colour appears), missing rate."""
    count = len(entity_results)
    if count == 0:
        return {"entities": 0, "mean_iou": math.nan, "success_rate": math.nan, "mean_leak": math.nan, "missing_rate": math.nan}
    leaks = [r["leak"] for r in entity_results if not math.isnan(r["leak"])]
    return {
        "entities": count,
        "mean_iou": float(np.mean([r["iou"] for r in entity_results])),
        "success_rate": float(np.mean([r["success"] for r in entity_results])),
        "mean_leak": float(np.mean(leaks)) if leaks else math.nan,
        "missing_rate": float(np.mean([r["missing"] for r in entity_results])),
    }


def score_images(images, masks_per_image, prompts_per_image):
    """Score a set of images. Returns {"summary": {...}, "images": [[entity results], ...]}."""
    if not (len(images) == len(masks_per_image) == len(prompts_per_image)):
        raise ValueError(
            f"{len(images)} images, {len(masks_per_image)} mask sets and {len(prompts_per_image)} prompt sets: "
            "they must match one to one")
    per_image = []
    for i, (image, masks, prompts) in enumerate(zip(images, masks_per_image, prompts_per_image)):
        try:
            per_image.append(score_image(image, masks, prompts))
        except ValueError as error:
            raise ValueError(f"image {i}: {error}") from None
    flat = [r for results in per_image for r in results]
    return {"summary": summarise(flat), "images": per_image}


def score_entity_batches(images, entity_sets):
    """Node-facing form: images = list of IMAGE tensors [B, H, W, 3] in [0, 1], entity_sets = list of
    entity tuples (objects with .mask [H, W] and .label). Every image of batch i is scored against
    entity set i. Returns score_images' result."""
    if len(images) != len(entity_sets):
        raise ValueError(f"{len(images)} image batches but {len(entity_sets)} entity sets: they must match one to one")
    flat_images, masks, prompts = [], [], []
    for batch, entities in zip(images, entity_sets):
        for image in batch:
            flat_images.append(image.detach().cpu().float().numpy())
            masks.append([entity.mask.detach().cpu().float().numpy() for entity in entities])
            prompts.append([entity.label for entity in entities])
    return score_images(flat_images, masks, prompts)


def format_summary(summary):
    return (f"mean IoU {summary['mean_iou']:.3f}, success {100 * summary['success_rate']:.1f}%, "
            f"leak {summary['mean_leak']:.2f}, missing {100 * summary['missing_rate']:.1f}% "
            f"({summary['entities']} entities)")


def score_folder(images_dir, dataset_dir):
    """Score images_dir/*.png (sorted) against the records of a dataset folder (metadata.json), in order."""
    with open(os.path.join(dataset_dir, "metadata.json")) as f:
        records = json.load(f)
    names = sorted(n for n in os.listdir(images_dir) if n.lower().endswith(".png"))
    if len(names) != len(records):
        raise ValueError(f"{images_dir} has {len(names)} PNG images but {dataset_dir} has {len(records)} records")
    root = os.path.realpath(dataset_dir)
    images, masks, prompts = [], [], []
    for i, (name, record) in enumerate(zip(names, records)):
        images.append(np.asarray(Image.open(os.path.join(images_dir, name)).convert("RGB")))
        record_masks = []
        for mask_name in record.get("eligen_entity_masks", []):
            path = os.path.realpath(os.path.join(root, mask_name))
            if os.path.commonpath([root, path]) != root:
                raise ValueError(f"record {i}: mask {mask_name!r} lies outside the dataset folder")
            record_masks.append(np.asarray(Image.open(path).convert("L")) > 127)
        masks.append(record_masks)
        prompts.append(record.get("eligen_entity_prompts", []))
    return score_images(images, masks, prompts)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Placement metric: IoU between where each entity's colour appears and its mask.")
    parser.add_argument("images", help="folder of generated PNGs, one per dataset record (sorted by name)")
    parser.add_argument("dataset", help="dataset folder with metadata.json (the layouts the images were made from)")
    parser.add_argument("--json", help="write the full result here")
    args = parser.parse_args(argv)
    result = score_folder(args.images, args.dataset)
    print(format_summary(result["summary"]))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
