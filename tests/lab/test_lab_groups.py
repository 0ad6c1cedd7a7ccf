"""Held-out layout groups: deterministic per (group, seed, index), each keeping its promise."""

import numpy as np
import pytest
import torch

from comfyui_eligen.core.attention import mask_to_token_grid
from comfyui_eligen.lab import groups
from comfyui_eligen.toyworld import data

COUNT = 16


def group_layouts(group, seed=0, size=data.SIZE):
    return [groups.make_layout("heldout", seed, i, size, group=group) for i in range(COUNT)]


def tokens(mask, grid):
    """Tokens of a grid x grid token grid (2x2 patches of a 2*grid latent) the mask rule gives the mask."""
    return int(mask_to_token_grid(torch.from_numpy(mask.astype(np.float32)), (2 * grid, 2 * grid)).sum())


def check_drawn(layout):
    """Masks and prompts agree with the image: each entity's colour is on its mask wherever no later
    entity is drawn over it, and the caption names every entity."""
    for k, entity in enumerate(layout.entities):
        assert entity.prompt in layout.caption
        visible = entity.mask & ~np.any([e.mask for e in layout.entities[k + 1:]] or [np.zeros_like(entity.mask)], axis=0)
        assert np.all(layout.image[visible] == data.PALETTE[entity.colour])
        assert visible.any()


def test_groups_are_deterministic_distinct_and_leave_the_easy_stream_alone():
    assert np.array_equal(data.make_layout("heldout", 0, 3).image, groups.make_layout("heldout", 0, 3, group="easy").image)
    seen = set()
    for group in groups.GROUPS:
        again = groups.make_layout("heldout", 1, 2, group=group)
        assert np.array_equal(again.image, groups.make_layout("heldout", 1, 2, group=group).image)
        images = {layout.image.tobytes() for layout in group_layouts(group)}
        assert len(images) == COUNT and not images & seen
        seen |= images
    with pytest.raises(ValueError, match="layout group must be one of .* not 'hard'"):
        groups.make_layout("heldout", 0, 0, group="hard")


@pytest.mark.parametrize("size", [data.SIZE, data.QUICK_SIZE])
@pytest.mark.parametrize("group", [g for g in groups.GROUPS if g != "easy"])
def test_each_group_keeps_its_promise(group, size):
    layouts = group_layouts(group, size=size)
    for layout in layouts:
        check_drawn(layout)
        entities = layout.entities
        colours = [e.colour for e in entities]
        masks = layout.masks
        if group == "many":
            assert 5 <= len(entities) <= 6 and len(set(colours)) == len(colours)
            assert masks.sum(axis=0).max() == 1
        elif group == "same_colour":
            assert 2 <= len(entities) <= 3 and len(set(colours)) == 1
            assert len({e.shape for e in entities}) == len(entities)
            assert masks.sum(axis=0).max() == 1
        elif group == "small":
            assert 2 <= len(entities) <= 4 and all(2 <= tokens(e.mask, 8) <= 4 for e in entities)
        elif group == "tiny":  # 2-4 of the image's own tokens (16 px each)
            assert 2 <= len(entities) <= 4 and all(2 <= tokens(e.mask, size // 16) <= 4 for e in entities)
        elif group == "touching":
            assert 2 <= len(entities) <= 4 and len(set(colours)) == len(colours)
            for k in range(1, len(entities)):
                grown = torch.nn.functional.max_pool2d(
                    torch.from_numpy(masks[k:k + 1].astype(np.float32)), 3, 1, 1)[0].numpy() > 0
                assert (grown & masks[:k].any(axis=0)).any()  # touches or overlaps an earlier entity
        elif group == "border":
            first = entities[0].mask
            edges = np.concatenate([first[0], first[-1], first[:, 0], first[:, -1]])
            assert edges.any()  # cut by the border
            whole = data.shape_mask(entities[0].shape, (size / 2, size / 2), entities[0].radius, size).sum()
            assert 0.25 <= first.sum() / whole <= 0.75
    counts = {len(layout.entities) for layout in layouts}
    assert len(counts) > 1  # the entity count varies within the group
