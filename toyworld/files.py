"""The toy world's PNG and JSON writes, atomic (core.files: a temp file in the target folder first)."""

import json
import math

import numpy as np
from PIL import Image

from ..core.files import atomic_path


def save_png(image, path):
    """A PIL image or a uint8 array [H, W(, 3)] as PNG."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    with atomic_path(path) as temp:
        image.save(temp, format="PNG")
    return path


def _plain(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.bool_, np.integer, np.floating)):
        return _plain(value.item())
    return value


def write_json(path, payload):
    """JSON with NaN written as null."""
    with atomic_path(path) as temp:
        with open(temp, "w") as f:
            json.dump(_plain(payload), f, indent=1)
    return path
