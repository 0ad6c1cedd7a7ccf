"""Atomic writes: everything the toy world writes goes to a temp file in the target folder first."""

import json
import math
import os
import tempfile
from contextlib import contextmanager

import numpy as np


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path):
    """Yields a temp path beside `path`; on success it replaces `path`, on failure it is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        yield temp
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def save_png(image, path):
    """A PIL image or a uint8 array [H, W(, 3)] as PNG."""
    from PIL import Image

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
