"""The style set of the stacked-style robustness row: a captions-only dataset whose background is a
visible gradient, and the measure that tells whether generated images show it."""

import numpy as np

from comfyui_eligen.lab import style
from comfyui_eligen.toyworld import data
from comfyui_eligen.training.dataset import load_dataset


def test_style_set_has_captions_only_and_a_gradient_background(tmp_path):
    style.write_style_dataset(str(tmp_path), 4, seed=2)
    dataset = load_dataset(str(tmp_path))
    layouts = [data.make_layout("train", 2, i) for i in range(4)]
    styled = []
    for record, layout in zip(dataset.records, layouts):
        assert record.prompt == layout.caption and record.entity_prompts == []
        image = record.load_image()
        styled.append(image)
        inside = layout.masks.any(axis=0)
        assert np.array_equal(image[inside], layout.image[inside])  # the entities are untouched
        column = image[:, :, 0][~inside.any(axis=1)[:, None].repeat(image.shape[1], 1) & ~inside]
        assert column.min() >= style.GRADIENT[0] and column.max() <= style.GRADIENT[1]
    strength = style.gradient_strength(styled, layouts)
    assert 140 < strength < style.GRADIENT[1] - style.GRADIENT[0]
    assert abs(style.gradient_strength([layout.image for layout in layouts], layouts)) < 1e-9
    assert abs(style.gradient_strength([image.astype(np.float32) / 255 for image in styled], layouts) - strength) < 1e-3
