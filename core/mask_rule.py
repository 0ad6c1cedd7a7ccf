"""The one mask rule, shared by sampling, training and the preview.

The reference turns an entity mask into image tokens like this: resize the mask image with PIL's
NEAREST filter straight to the latent size, keep pixels above half intensity, and count a
``patch x patch`` group of latent pixels as inside when any of its pixels is. Every mask is resized on
its own, from its own size, exactly once.

PIL's NEAREST index rule (measured against ``PIL.Image.resize``, Pillow 9-13): for a side of ``source``
pixels resized to ``target``, the step is ``a = source / target`` (a double); output pixel ``i`` reads
source pixel ``int(x_i)`` where ``x_0 = a / 2`` and ``x_{i+1} = x_i + a``, accumulated in double
precision. The accumulation (not ``floor((i + 0.5) * a)``) decides exact ties, e.g. a 200-pixel side
resized to 43 reads pixel 99 at output 21, where ``(21 + 0.5) * 200 / 43 = 100.0`` exactly.
"""

import functools

import numpy as np
import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=4096)
def _nearest_index_array(source, target):
    step = source / target
    increments = np.full(target, step, dtype=np.float64)
    increments[0] = step * 0.5
    # numpy's cumsum adds one element after the other, the same double additions PIL makes.
    positions = np.cumsum(increments)
    indices = np.minimum(positions.astype(np.int64), source - 1)
    indices.setflags(write=False)
    return indices


def nearest_indices(source, target):
    """Source pixel read by each of ``target`` output pixels (PIL NEAREST): int64 numpy array."""
    source, target = int(source), int(target)
    if source < 1 or target < 1:
        raise ValueError(f"cannot resize a side of {source} pixels to {target} pixels")
    return _nearest_index_array(source, target)


def resize_nearest(masks, size):
    """``[..., H, W]`` (tensor or numpy array) -> ``[..., h, w]`` with PIL NEAREST, ``size = (h, w)``."""
    height, width = int(size[0]), int(size[1])
    rows = nearest_indices(masks.shape[-2], height)
    cols = nearest_indices(masks.shape[-1], width)
    if isinstance(masks, np.ndarray):
        return masks[..., rows[:, None], cols[None, :]]
    rows, cols = torch.tensor(rows, device=masks.device), torch.tensor(cols, device=masks.device)
    return masks.index_select(-2, rows).index_select(-1, cols)


def masks_to_latent(masks, latent_hw, mask_sizes=None):
    """Entity masks ``[..., N, H, W]`` (values in [0, 1]) -> bool ``[..., N, h, w]`` at the latent size.

    ``mask_sizes``: the real (height, width) of each of the N masks when they are stored padded to a
    common ``H x W`` (top-left aligned); every mask is resized from its own size.
    """
    if mask_sizes is None:
        return resize_nearest(masks, latent_hw) > 0.5
    if len(mask_sizes) != masks.shape[-3]:
        raise ValueError(f"{len(mask_sizes)} mask sizes for {masks.shape[-3]} masks")
    out = [resize_nearest(masks[..., k, :int(h), :int(w)], latent_hw) > 0.5
           for k, (h, w) in enumerate(mask_sizes)]
    return torch.stack(out, dim=-3)


def latent_to_token_grid(inside, patch=2):
    """bool ``[..., h, w]`` -> bool ``[..., ceil(h/patch), ceil(w/patch)]``: a patch is inside if any
    of its pixels is (zero padding at the bottom and right edges)."""
    h, w = inside.shape[-2:]
    lead = inside.shape[:-2]
    flat = inside.reshape(-1, 1, h, w).float()
    padded = F.pad(flat, (0, (-w) % patch, 0, (-h) % patch))
    grid = F.max_pool2d(padded, kernel_size=patch) > 0
    return grid.reshape(*lead, grid.shape[-2], grid.shape[-1])


# ---------------------------------------------------------------------------------------------------
# Aspect

ASPECT_SLACK = 2  # latent pixels (one token) of tolerance on each side


def aspect_problem(mask_hw, latent_hw, slack=ASPECT_SLACK, scale=None):
    """None when a mask of ``mask_hw`` fits a latent of ``latent_hw``, else the reason (a sentence part).

    A latent ``h x w`` comes from images of ``8h..8h+7 x 8w..8w+7`` pixels, so its aspect is known
    only to about one latent pixel. A mask fits when its aspect lies between those of ``h x (w + slack)``
    and ``(h + slack) x w``; an image-sized mask always fits. Integers only: no rounding at the edges.
    ``scale`` (image pixels per latent cell): name the image's size in pixels, as the user typed it.
    """
    mh, mw = int(mask_hw[0]), int(mask_hw[1])
    h, w = int(latent_hw[0]), int(latent_hw[1])
    if mh < 1 or mw < 1:
        return f"mask is {mw}x{mh} (empty)"
    if h * mw <= mh * (w + slack) and mh * w <= (h + slack) * mw:
        return None
    target = (f"the image being sampled is {w * scale}x{h * scale} pixels (its latent is {w}x{h}; "
              if scale else f"the latent is {w}x{h} (")
    return (f"mask is {mw}x{mh} (aspect {mw / mh:.3f}) but {target}aspect {w / h:.3f}; masks "
            f"of aspect {w / (h + slack):.3f} to {(w + slack) / h:.3f} fit it)")


def check_mask_aspect(mask_hw, latent_hw, who):
    """ValueError starting with ``who`` when the mask does not fit the latent (see ``aspect_problem``)."""
    problem = aspect_problem(mask_hw, latent_hw)
    if problem:
        raise ValueError(f"{who}: {problem}; draw the masks at the image's aspect ratio")
