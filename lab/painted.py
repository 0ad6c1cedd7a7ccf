"""The toy world's painted-layout workflow: a layout painted as a user would (flat palette colours on
white, soft anti-aliased edges) -> EliGen Painted Layout -> the toy model with the trained EliGen LoRA.

`write_picture` writes the painted picture into example_workflows/inputs/ (the package copies it into
ComfyUI's input folder at start-up); lab/workflows.py writes the template (its API graph and UI twin).
"""

import os

import numpy as np
import torch
from PIL import Image

from ..core.layouts import masks_in_reading_order
from ..toyworld import data
from ..toyworld.files import save_png
from .evaluate import SAMPLER, TEXT_LENGTH
from .workflows import EXAMPLES_DIR, LORA_NAME, TEMPLATE_NAMES, score_text

NAME = TEMPLATE_NAMES["e"]
LAYOUT_FILE = "eligen_toy_painted_layout.png"  # in ComfyUI's input folder
SCALE = 4  # painted at 4x and reduced with LANCZOS: soft edges like a brush or a resized drawing
PAPER = (255, 255, 255)


def example_layout(seed=0, entities=3, size=data.SIZE):
    """The first held-out layout (seed ``seed``) with ``entities`` shapes."""
    index = 0
    while True:
        layout = data.make_layout("heldout", seed, index, size)
        if len(layout.entities) == entities:
            return layout
        index += 1


def paint(layout, scale=SCALE):
    """The layout painted on white at ``scale`` times the size, reduced with LANCZOS: PIL RGB image."""
    size = layout.image.shape[0]
    big = np.empty((size * scale, size * scale, 3), np.uint8)
    big[:] = PAPER
    for entity in layout.entities:
        centre = (entity.centre[0] * scale, entity.centre[1] * scale)
        big[data.shape_mask(entity.shape, centre, entity.radius * scale, size * scale)] = data.PALETTE[entity.colour]
    return Image.fromarray(big).resize((size, size), Image.LANCZOS)


def prompts_in_reading_order(layout):
    """The entity prompts in the order EliGen Painted Layout pairs them with colours (its reading order)."""
    masks = torch.from_numpy(np.stack([entity.mask for entity in layout.entities]))
    return [layout.entities[k].prompt for k in masks_in_reading_order(masks)]


def painted_workflow(layout, lora_name=LORA_NAME, batch_size=4, seed=0, prefix="eligen_toy",
                     sampler=SAMPLER, layout_file=LAYOUT_FILE):
    """LoadImage (the painted layout) -> EliGen Painted Layout -> EliGen Apply with the LoRA (none when
    ``lora_name`` is None: the base model with EliGen attention) -> KSampler -> SaveImage + metric."""
    name = f"{prefix}/{'painted_lora' if lora_name else 'painted_base'}"
    graph = {
        "1": {"class_type": "EliGenToyModelLoader", "inputs": {"family": "flux", "weights": "pretrained", "seed": 0}},
        "2": {"class_type": "LoadImage", "inputs": {"image": layout_file}},
        "3": {"class_type": "EliGenPaintedLayout", "inputs": {
            "layout": ["2", 0], "clip": ["1", 1], "prompts": "\n".join(prompts_in_reading_order(layout)),
            "background": "largest", "min_area_percent": 0.5, "text_length": TEXT_LENGTH}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": layout.caption, "clip": ["1", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {
            "width": layout.image.shape[1], "height": layout.image.shape[0], "batch_size": batch_size}},
        "8": {"class_type": "EliGenApply", "inputs": {
            "model": ["1", 0], "positive": ["4", 0], "entities": ["3", 0], "negative": ["5", 0],
            "entities_on_negative": False, "start_percent": 0.0, "end_percent": 1.0}},
        "9": {"class_type": "KSampler", "inputs": {
            "model": ["8", 0], "seed": seed, "steps": sampler["steps"], "cfg": sampler["cfg"],
            "sampler_name": sampler["sampler_name"], "scheduler": sampler["scheduler"],
            "positive": ["8", 1], "negative": ["8", 2], "latent_image": ["6", 0], "denoise": 1.0}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": name}},
        "12": {"class_type": "EliGenPlacementMetric", "inputs": {
            "images": ["10", 0], "entities": ["3", 0], "filename_prefix": name}},
        "13": {"class_type": "EliGenPreviewEntities", "inputs": {
            "image": ["2", 0], "entities": ["3", 0], "opacity": 0.45, "labels": True}},
        "14": score_text(12),
    }
    if lora_name:
        graph["7"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["1", 0], "lora_name": lora_name, "strength_model": 1.0}}
        graph["8"]["inputs"]["model"] = ["7", 0]
    return graph


def write_picture(folder=EXAMPLES_DIR):
    """The painted picture the template loads: example_workflows/inputs/<LAYOUT_FILE>. Returns its path."""
    return save_png(paint(example_layout()), os.path.join(folder, "inputs", LAYOUT_FILE))
