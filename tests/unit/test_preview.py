"""The entity preview: masks tinted and outlined, labels drawn, everything else untouched."""

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
