"""The entity preview: masks tinted and outlined, labels drawn, everything else untouched."""

import os
from types import SimpleNamespace

import pytest
import torch

from comfyui_eligen.nodes import preview


def grey_canvas(batch=1, height=96, width=128):
    return torch.full((batch, height, width, 3), 0.5)


def box_mask(height, width, top, left, bottom, right):
    mask = torch.zeros(height, width)
    mask[top:bottom, left:right] = 1.0
    return mask


def test_masks_are_tinted_outlined_and_the_rest_is_unchanged():
    image = grey_canvas(batch=2)
    masks = [box_mask(96, 128, 10, 10, 50, 60), box_mask(96, 128, 40, 80, 90, 120)]
    out = preview.overlay_entities(image, masks, ["a red fox", "a blue ball"], opacity=0.5, draw_labels=False)
    assert out.shape == image.shape
    red, blue = torch.tensor(preview.PALETTE[0]), torch.tensor(preview.PALETTE[1])
    # Inside: the tint (away from the outline); both frames of the batch.
    assert torch.allclose(out[:, 30, 30], 0.5 * 0.5 + red * 0.5)
    assert torch.allclose(out[:, 60, 100], 0.5 * 0.5 + blue * 0.5)
    # Border pixels carry the solid colour.
    assert torch.allclose(out[0, 10, 30], red) and torch.allclose(out[0, 30, 59], red)
    # Outside every mask: untouched.
    outside = (masks[0] + masks[1]) == 0
    assert torch.equal(out[:, outside], image[:, outside])


def test_labels_are_drawn_near_the_mask_centre():
    image = grey_canvas()
    masks = [box_mask(96, 128, 20, 20, 80, 110)]
    plain = preview.overlay_entities(image, masks, ["a red fox"], draw_labels=False)
    labelled = preview.overlay_entities(image, masks, ["a red fox"], draw_labels=True)
    changed = (labelled - plain).abs().sum(-1)[0] > 0.05
    ys, xs = torch.nonzero(changed, as_tuple=True)
    assert len(ys) > 30  # text and its box, not a stray pixel
    assert abs(ys.float().mean().item() - 50) < 8 and abs(xs.float().mean().item() - 65) < 12
    # White text pixels inside the black label box.
    assert (labelled[0][changed] > 0.95).all(-1).any()
    assert (labelled[0][changed] < 0.05).all(-1).any()


def test_masks_of_another_resolution_are_resized_to_the_image():
    image = grey_canvas(height=64, width=64)
    small = box_mask(16, 16, 0, 0, 8, 8)  # top-left quarter at a quarter of the resolution
    out = preview.overlay_entities(image, [small], ["x"], draw_labels=False)
    tinted = (out[0] - image[0]).abs().sum(-1) > 0
    assert tinted[:32, :32].all() and not tinted[32:, :].any() and not tinted[:, 32:].any()


def test_empty_mask_still_gets_a_label_and_bad_shapes_are_named():
    image = grey_canvas()
    out = preview.overlay_entities(image, [torch.zeros(96, 128)], ["ghost"], draw_labels=True)
    assert (out[0, :20, :60] != 0.5).any()
    with pytest.raises(ValueError, match=r"\[H, W\], got shape \(1, 4, 4\)"):
        preview.overlay_entities(image, [torch.zeros(1, 4, 4)], ["x"])


def test_node_execute_returns_the_image_and_a_ui_preview(tmp_path):
    import folder_paths

    old_temp = folder_paths.get_temp_directory()
    folder_paths.set_temp_directory(str(tmp_path))
    try:
        entities = (SimpleNamespace(mask=box_mask(96, 128, 0, 0, 48, 64), label="cat"),)
        result = preview.EliGenPreviewEntities.execute(grey_canvas(), entities)
    finally:
        folder_paths.set_temp_directory(old_temp)
    assert result.result[0].shape == (1, 96, 128, 3)
    images = result.ui.as_dict()["images"]
    assert len(images) == 1 and (tmp_path / images[0]["filename"]).exists()


def test_preview_node_in_a_real_server(comfy_server):
    """Real entities from EliGen Entity nodes, drawn on a stock EmptyImage; the UI gets the picture."""
    import numpy as np
    from PIL import Image

    graph = {
        "1": {"class_type": "EliGenToyModelLoader", "inputs": {"family": "flux", "weights": "random", "seed": 0}},
        "2": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}},
        "3": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 32}},
        "4": {"class_type": "MaskComposite", "inputs": {"destination": ["2", 0], "source": ["3", 0], "x": 32, "y": 0,
                                                        "operation": "add"}},
        "5": {"class_type": "EliGenEntity", "inputs": {"mask": ["4", 0], "clip": ["1", 1], "text": "red circle",
                                                       "label": "red circle"}},
        "6": {"class_type": "EmptyImage", "inputs": {"width": 128, "height": 128, "batch_size": 1, "color": 0x808080}},
        "7": {"class_type": "EliGenPreviewEntities", "inputs": {"image": ["6", 0], "entities": ["5", 0],
                                                               "opacity": 0.5, "labels": False}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "eligen_preview"}},
    }
    entry = comfy_server.run_workflow(graph)
    (shown,) = entry["outputs"]["7"]["images"]  # the preview the UI shows on the node
    assert shown["type"] == "temp" and shown["filename"].endswith(".png")
    (path,) = [p for p in comfy_server.output_files(entry) if "eligen_preview" in os.path.basename(p)]
    picture = np.asarray(Image.open(path), dtype=np.float32) / 255.0
    assert picture.shape == (128, 128, 3)
    red = np.array(preview.PALETTE[0])
    # The mask (top-right quarter at 64 px) lands on the top-right quarter of the 128 px image.
    assert np.allclose(picture[30, 100], 0.5 * (128 / 255) + 0.5 * red, atol=2 / 255)
    assert np.allclose(picture[100, 30], 128 / 255, atol=1 / 255)
