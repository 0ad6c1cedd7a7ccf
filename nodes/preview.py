"""Entity preview node: each entity mask tinted in its own colour, outlined and labelled on an image."""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from comfy_api.latest import io, ui

from ..core.conditioning import describe
from ..core.mask_rule import check_mask_aspect, resize_nearest

# Distinct, saturated colours (RGB 0-1); entity k gets PALETTE[k % len].
PALETTE = (
    (0.90, 0.10, 0.10), (0.10, 0.45, 0.95), (0.10, 0.80, 0.20), (0.95, 0.80, 0.05),
    (0.85, 0.15, 0.85), (0.05, 0.85, 0.85), (1.00, 0.50, 0.00), (0.55, 0.30, 0.95),
)
LABEL_CHARS = 40


def resize_mask(mask, height, width):
    """An entity mask of any size -> bool [height, width] (the mask rule of core/mask_rule.py: PIL
    nearest, then half intensity, as EliGen reads masks)."""
    mask = torch.as_tensor(mask, dtype=torch.float32)
    if mask.ndim != 2:
        raise ValueError(f"an entity mask must be [H, W], got shape {tuple(mask.shape)}")
    return resize_nearest(mask, (height, width)) > 0.5


def check_preview_aspects(masks, labels, height, width):
    """Refuse what sampling would refuse: each mask must fit the latent of a ``width x height`` image
    (the same check as the model patch, core/mask_rule.py)."""
    latent_hw = (max(1, height // 8), max(1, width // 8))
    for index, (mask, label) in enumerate(zip(masks, labels)):
        check_mask_aspect(tuple(mask.shape[-2:]), latent_hw,
                          f"{describe(index, label)} (previewed on a {width}x{height} image)")


def mask_outline(region, width):
    """Pixels of ``region`` (bool [H, W]) within ``width`` pixels of its border."""
    outside = (~region).float()[None, None]
    near_outside = F.max_pool2d(F.pad(outside, [width] * 4, value=1.0), 2 * width + 1, stride=1)[0, 0] > 0
    return region & near_outside


def label_font(size):
    """PIL's own default font at ``size`` pixels (the bitmap fallback where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def label_text(index, label):
    text = f"{index}: {label}" if label else str(index)
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 3] + "..."


def overlay_entities(images, masks, labels, opacity=0.45, draw_labels=True):
    """Tint each mask over every image of the batch, outline it and write its label near its centre.

    images: float [B, H, W, 3] in [0, 1] (ComfyUI IMAGE); masks: list of [h, w] arrays at any size;
    labels: one string per mask. Returns a new IMAGE tensor; pixels outside all masks and labels stay.
    """
    if images.ndim != 4 or images.shape[-1] < 3:
        raise ValueError(f"the image must be [B, H, W, 3], got shape {tuple(images.shape)}")
    if len(masks) != len(labels):
        raise ValueError(f"{len(masks)} masks but {len(labels)} labels")
    _, height, width, _ = images.shape
    out = images[..., :3].detach().float().cpu().clone()
    line = max(1, min(height, width) // 160)
    regions = [resize_mask(mask, height, width) for mask in masks]
    check_preview_aspects(masks, labels, height, width)
    for k, region in enumerate(regions):
        colour = torch.tensor(PALETTE[k % len(PALETTE)])
        out[:, region] = out[:, region] * (1 - opacity) + colour * opacity
        out[:, mask_outline(region, line)] = colour
    if not draw_labels or not regions:
        return out
    pictures = [Image.fromarray((frame.numpy() * 255).round().astype(np.uint8)) for frame in out]
    font = label_font(max(10, min(height, width) // 40))
    for k, (region, label) in enumerate(zip(regions, labels)):
        text = label_text(k, label)
        colour = tuple(int(c * 255) for c in PALETTE[k % len(PALETTE)])
        for picture in pictures:
            draw = ImageDraw.Draw(picture)
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            text_w, text_h = right - left, bottom - top
            if region.any():
                ys, xs = torch.nonzero(region, as_tuple=True)
                cx, cy = xs.float().mean().item(), ys.float().mean().item()
            else:  # an empty mask still gets its label, stacked in the top-left corner
                cx, cy = text_w / 2 + 2, (text_h + 6) * k + text_h / 2 + 2
            x = int(min(max(cx - text_w / 2, 0), max(width - text_w - 2, 0)))
            y = int(min(max(cy - text_h / 2, 0), max(height - text_h - 2, 0)))
            draw.rectangle((x - 2, y - 2, x + text_w + 2, y + text_h + 2), fill=(0, 0, 0), outline=colour)
            draw.text((x - left, y - top), text, fill=(255, 255, 255), font=font)
    return torch.stack([torch.from_numpy(np.asarray(p, dtype=np.float32) / 255.0) for p in pictures])


class EliGenPreviewEntities(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EliGenPreviewEntities",
            display_name="EliGen Preview Entities",
            category="EliGen/entities",
            description="Draws each entity's mask (tinted, outlined) and label over an image to check a layout.",
            is_output_node=True,
            inputs=[
                io.Image.Input("image", tooltip="The picture to draw on: a generated image, or an empty canvas."),
                io.Custom("ELIGEN_ENTITIES").Input("entities", tooltip="The entities whose masks and labels are drawn."),
                io.Float.Input("opacity", default=0.45, min=0.0, max=1.0, step=0.05,
                               tooltip="How strongly each mask's colour covers the image."),
                io.Boolean.Input("labels", default=True, tooltip="Write each entity's index and label near its mask's centre."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The image with the entity layout drawn on it.")],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
        )

    @classmethod
    def execute(cls, image, entities, opacity=0.45, labels=True):
        masks = [entity.mask for entity in entities]
        names = [entity.label for entity in entities]
        drawn = overlay_entities(image, masks, names, opacity=opacity, draw_labels=labels)
        return io.NodeOutput(drawn, ui=ui.PreviewImage(drawn, cls=cls))


NODES = [EliGenPreviewEntities]
