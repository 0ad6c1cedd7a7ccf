"""Painted and box layouts as plain calls: anti-aliased paintings give exactly the painted entities and
their regions; every bad input is refused with a message naming the line or colour."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from comfyui_eligen.core import layouts
from comfyui_eligen.nodes.layouts import EliGenBoxLayout, EliGenPaintedLayout
from comfyui_eligen.toyworld.models import build_clip

SCALE = 4
BACKGROUND = (255, 255, 255)
# (colour, shape, box at 1x) in the order of first appearance in raster order (top rows first).
SHAPES = [
    ((220, 30, 30), "ellipse", (10, 6, 50, 40)),
    ((30, 60, 220), "rectangle", (70, 10, 120, 60)),
    ((40, 180, 60), "polygon", (20, 60, 100, 120)),
]


def painted(shapes=SHAPES, size=(128, 128), background=BACKGROUND):
    """(anti-aliased IMAGE [1, H, W, 3], exact region masks bool [N, H, W]): drawn at 4x, LANCZOS down.

    The exact masks are the 4x drawing's regions averaged over each 4x4 block (> half covered)."""
    w, h = size
    big = Image.new("RGB", (w * SCALE, h * SCALE), background)
    regions = Image.new("L", big.size, 0)
    draw, index = ImageDraw.Draw(big), ImageDraw.Draw(regions)
    for k, (colour, shape, (x0, y0, x1, y1)) in enumerate(shapes, start=1):
        box = [x0 * SCALE, y0 * SCALE, x1 * SCALE, y1 * SCALE]
        if shape == "polygon":
            box = [(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])]
        getattr(draw, shape)(box, fill=colour)
        getattr(index, shape)(box, fill=k)
    small = big.resize(size, Image.LANCZOS)
    labels = torch.from_numpy(np.asarray(regions, dtype=np.int64))
    onehot = F.one_hot(labels, len(shapes) + 1).permute(2, 0, 1).float()
    share = F.avg_pool2d(onehot[None], SCALE)[0]
    masks = share[1:] > 0.5
    image = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)[None]
    return image, masks


def border(masks, width=2):
    """Pixels within ``width`` of any region edge."""
    edges = torch.zeros(masks.shape[1:], dtype=torch.bool)
    for mask in masks.float():
        grown = F.max_pool2d(mask[None, None], 2 * width + 1, 1, width)[0, 0] > 0
        shrunk = -F.max_pool2d(-mask[None, None], 2 * width + 1, 1, width)[0, 0] > 0
        edges |= grown & ~shrunk
    return edges


PROMPTS = "red circle\nblue square\ngreen triangle"


def test_antialiased_painting_gives_the_painted_entities_and_regions():
    image, truth = painted()
    # the soft edges hold many in-between colours: the test would pass trivially without them
    assert len(torch.unique((image[0] * 255).round().reshape(-1, 3), dim=0)) > 50
    masks, prompts, colours = layouts.painted_layout(image, PROMPTS)
    assert prompts == ["red circle", "blue square", "green triangle"]
    assert colours == [layouts.hex_colour(c) for c, _, _ in SHAPES]
    assert masks.shape == truth.shape
    away = ~border(truth)
    for k in range(len(SHAPES)):
        assert torch.equal(masks[k].bool()[away], truth[k][away]), f"entity {k} differs away from the border"
        # and the whole region is found: the border disagreement is a thin line, not a missing piece
        assert (masks[k].bool() ^ truth[k]).sum() <= border(truth[k:k + 1]).sum()


def test_long_straight_soft_edges_do_not_become_entities():
    # a 1-row band of one in-between colour along a 128-pixel edge is 0.8 % of the image: above the
    # area threshold but has no solid pixels
    image, _ = painted([((0, 0, 0), "rectangle", (0, 40.5, 128, 128))], size=(128, 64))
    assert len(torch.unique((image[0] * 255).round().reshape(-1, 3), dim=0)) > 2
    masks, prompts, colours = layouts.painted_layout(image, "black ground")
    assert colours == ["#000000"] and masks.shape[0] == 1


def test_legend_orders_by_colour_and_background_choices():
    image, truth = painted()
    legend = "#28b43c: green triangle\n#dc1e1e: red circle\n#1e3cdc: blue square"
    masks, prompts, colours = layouts.painted_layout(image, legend)
    assert prompts == ["green triangle", "red circle", "blue square"]
    away = ~border(truth)
    assert torch.equal(masks[0].bool()[away], truth[2][away])
    # background "none": the white paper is an entity too (first in raster order)
    _, prompts, colours = layouts.painted_layout(image, "paper\n" + PROMPTS, background="none")
    assert colours[0] == "#ffffff" and len(colours) == 4
    # an explicit background colour: here the red circle is the background
    _, prompts, colours = layouts.painted_layout(image, "paper\nblue\ngreen", background="#dc1e1e")
    assert colours == ["#ffffff", "#1e3cdc", "#28b43c"]


@pytest.mark.parametrize("prompts, background, message", [
    ("red\nblue", "largest", "3 entity colours but 2 prompt lines"),
    ("a\nb\nc\nd", "largest", "#dc1e1e (6.6%, first at x=25, y=6), #1e3cdc"),
    ("#dc1e1e: red\nblue\n#28b43c: green", "largest", "line 2 ('blue') has no '#rrggbb:' colour"),
    ("#dc1e1e: red\n#00ffff: cyan\n#28b43c: green", "largest", "line 2: colour #00ffff covers no pixel"),
    ("#dc1e1e: red\n#28b43c: green", "largest", "painted colours without a legend line: #1e3cdc"),
    ("#dc1e1e: red\n#dd1e1e: red again\n#1e3cdc: b\n#28b43c: g", "largest", "line 2: colour #dd1e1e names the same"),
    (PROMPTS, "#00ffff", "background colour #00ffff covers no pixel"),
    ("#ffffff: paper\n#dc1e1e: r\n#1e3cdc: b\n#28b43c: g", "largest", "line 1: colour #ffffff is the background"),
    (PROMPTS, "teal", "background: 'teal' is not a colour"),
    ("", "largest", "no entity prompts"),
])
def test_bad_painted_layouts_are_named(prompts, background, message):
    image, _ = painted()
    with pytest.raises(ValueError) as error:
        layouts.painted_layout(image, prompts, background)
    assert message in str(error.value)


def test_unpainted_and_malformed_images_are_refused():
    with pytest.raises(ValueError, match="only the background colour"):
        layouts.painted_layout(torch.ones(1, 32, 32, 3), "thing")
    noise = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="no flat colour region"):
        layouts.painted_layout(noise, "thing")
    with pytest.raises(ValueError, match="batch holds 2 images"):
        layouts.painted_layout(torch.ones(2, 32, 32, 3), "thing")
    bad = torch.ones(1, 32, 32, 3)
    bad[0, 3, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        layouts.painted_layout(bad, "thing")


def test_boxes_in_pixels_and_fractions():
    masks, prompts = layouts.boxes_layout("0, 0, 32, 16\n\n16 16 16 48", "top\nright", 64, 48)
    assert prompts == ["top", "right"]
    assert masks[0].sum() == 32 * 16 and masks[0, :16, :32].all()
    assert masks[1].sum() == 16 * 32 and masks[1, 16:48, 16:32].all()  # clipped at the bottom
    fractions, _ = layouts.boxes_layout("0, 0, 0.5, 1/3".replace("1/3", "0.3333"), "left", 64, 48)
    assert torch.equal(fractions[0], layouts.box_masks([(1, (0, 0, 32, 16))], 64, 48)[0])
    # explicit units override auto
    pixels, _ = layouts.boxes_layout("0, 0, 1, 1", "dot", 64, 48, units="pixels")
    assert pixels[0].sum() == 1


@pytest.mark.parametrize("boxes, prompts, message", [
    ("0, 0, 10, 10\n5, 5, 10", "a\nb", "line 2 ('5, 5, 10'): expected 4 numbers"),
    ("0, 0, 10, 10\n\n5, 5, ten, 10", "a\nb", "line 3 ('5, 5, ten, 10'): x, y, w, h must be numbers"),
    ("0, 0, 10, -4", "a", "line 1 ('0, 0, 10, -4'): the width and height must be positive"),
    ("0, 0, 10, nan", "a", "line 1 ('0, 0, 10, nan'): x, y, w, h must be finite"),
    ("0, 0, 10, 10\n100, 100, 10, 10", "a\nb", "line 2 ('100, 100, 10, 10'): the box lies outside the 64x48"),
    ("0, 0, 10, 10\n5, 5, 10, 10", "only one", "2 boxes but 1 prompt lines"),
    ("", "a", "no boxes"),
    ("0, 0, 0.5, 0.5\n32, 0, 32, 48", "a\nb", "line 1 ('0, 0, 0.5, 0.5') reads as fractions (every number at most 1) but line 2"),
])
def test_bad_boxes_are_named(boxes, prompts, message):
    with pytest.raises(ValueError) as error:
        layouts.boxes_layout(boxes, prompts, 64, 48)
    assert message in str(error.value)


def test_nodes_make_entities_with_the_entity_helpers():
    clip = build_clip()
    image, truth = painted()
    entities, masks, legend = EliGenPaintedLayout.execute(image, clip, PROMPTS, text_length="real_length").result
    assert [e.label for e in entities] == ["red circle", "blue square", "green triangle"]
    assert legend.splitlines()[0] == "#dc1e1e: red circle"
    assert all(torch.equal(e.mask, m) for e, m in zip(entities, masks))
    expected = layouts.entity_conds.encode_entity_text(clip, "blue square", "real_length")
    assert torch.equal(entities[1].embeds, expected)
    more, box_masks = EliGenBoxLayout.execute("0, 0, 0.5, 0.5", "a red circle", clip, 128, 128,
                                              previous=entities).result
    assert len(more) == 4 and more[:3] == entities and more[3].mask.sum() == 64 * 64
    with pytest.raises(ValueError, match="too many entities"):
        EliGenBoxLayout.execute("\n".join(["0, 0, 8, 8"] * 14), "\n".join(["x"] * 14), clip, 64, 64,
                                previous=entities)
