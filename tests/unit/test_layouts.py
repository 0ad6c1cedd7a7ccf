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
    # background "none": the white paper is an entity too; its centre lies under the green triangle's,
    # so the reading order is in doubt and a legend (here by colour names) pairs the prompts
    with pytest.raises(ValueError, match="the order of the colours is not clear"):
        layouts.painted_layout(image, "paper\n" + PROMPTS, background="none")
    _, prompts, colours = layouts.painted_layout(image, "green: g\nwhite: paper\nred: r\nblue: b", background="none")
    assert colours == ["#28b43c", "#ffffff", "#dc1e1e", "#1e3cdc"] and prompts == ["g", "paper", "r", "b"]
    # an explicit background colour: here the red circle is the background
    _, prompts, colours = layouts.painted_layout(image, "white: paper\nblue: b\n#28b43c: g", background="#dc1e1e")
    assert colours == ["#ffffff", "#1e3cdc", "#28b43c"] and prompts == ["paper", "b", "g"]


@pytest.mark.parametrize("prompts, background, message", [
    ("red\nblue", "largest", "3 entity colours but 2 prompt lines"),
    ("a\nb\nc\nd", "largest", "in reading order: #dc1e1e (6.6%, centre x=30, y=23), #1e3cdc (15.3%, centre x=94"),
    ("#dc1e1e: red\nblue\n#28b43c: green", "largest", "line 2 ('blue') has no colour ('#rrggbb:' or a colour name"),
    ("red: r\nyellow: y\ngreen: g", "largest", "line 2: no painted colour is near yellow (#fff000)"),
    ("red: r\n#1e3cdc: b\ngreen: g\nwhite: paper", "largest", "line 4: colour white is the background"),
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
    with pytest.raises(ValueError, match="holds one colour, #ffffff, and it is the background"):
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


# ---- robust by construction: stray pixels, strokes, noise, compression, and what is refused --------

EXPECTED_COLOURS = [layouts.hex_colour(c) for c, _, _ in SHAPES]


def grown(mask, width):
    return F.max_pool2d(mask.float()[None, None], 2 * width + 1, 1, width)[0, 0] > 0


def assert_paired_and_clean(image, truth, width=2):
    """The prompts go with their painted colours (within a few 0-255 units), each mask is its region away
    from the edges, and no mask holds a pixel farther than ``width`` from its region (no speck anywhere)."""
    masks, prompts, colours = layouts.painted_layout(image, PROMPTS)
    assert prompts == PROMPTS.splitlines() and len(colours) == len(SHAPES)
    for found, (painted_colour, _, _) in zip(colours, SHAPES):
        assert (layouts.parse_hex(found, "found") - torch.tensor(painted_colour)).abs().max() <= 6, colours
    away = ~border(truth, width)
    for k in range(len(SHAPES)):
        assert torch.equal(masks[k].bool()[away], truth[k][away]), f"entity {k} differs away from the edges"
        assert not (masks[k].bool() & ~grown(truth[k], width)).any(), f"entity {k} holds pixels far from its region"
    return masks


def set_pixels(image, where, colour):
    image = image.clone()
    image[0][where] = torch.tensor(colour, dtype=torch.float32) / 255.0
    return image


@pytest.mark.parametrize("case", ["dot at (0, 0)", "stroke across the top", "dot in the red circle"])
def test_stray_pixels_and_strokes_change_neither_pairing_nor_masks(case):
    image, truth = painted()
    blue, green = SHAPES[1][0], SHAPES[2][0]
    if case == "dot at (0, 0)":  # first in raster order: it paired "red circle" with blue before
        image = set_pixels(image, (0, 0), blue)
    elif case == "stroke across the top":
        image = set_pixels(image, (0, slice(None)), green)
    else:
        image = set_pixels(image, (20, 30), green)
    assert_paired_and_clean(image, truth)


@pytest.mark.parametrize("share", [0.01, 0.03, 0.05])
def test_speckle_noise_changes_neither_pairing_nor_masks(share):
    image, truth = painted()
    generator = torch.Generator().manual_seed(int(share * 100))
    specks = torch.rand(image.shape[1:3], generator=generator) < share
    palette = torch.tensor([c for c, _, _ in SHAPES] + [BACKGROUND], dtype=torch.float32) / 255.0
    count = int(specks.sum())
    values = torch.where(torch.rand(count, 1, generator=generator) < 0.5,  # half painted colours, half any
                         palette[torch.randint(len(palette), (count,), generator=generator)],
                         torch.rand(count, 3, generator=generator))
    noisy = image.clone()
    noisy[0][specks] = values
    assert assert_paired_and_clean(noisy, truth).sum() > 0


def test_jpeg_at_quality_40_pairs_and_keeps_the_regions():
    import io as bytes_io

    image, truth = painted()
    buffer = bytes_io.BytesIO()
    Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8)).save(buffer, format="JPEG", quality=40)
    decoded = np.asarray(Image.open(bytes_io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.float32) / 255.0
    assert np.abs(decoded - image[0].numpy()).max() > 0.2  # the compression is visible
    assert_paired_and_clean(torch.from_numpy(decoded)[None], truth, width=3)


def test_reading_order_uses_each_colours_bulk_not_its_first_pixel():
    # the tall blue bar starts highest, but the red circle's centre is the topmost: red is read first
    shapes = [((220, 30, 30), "ellipse", (10, 12, 50, 44)), ((30, 60, 220), "rectangle", (80, 2, 110, 124))]
    image, truth = painted(shapes)
    masks, prompts, colours = layouts.painted_layout(image, "red circle\nblue bar")
    assert colours == ["#dc1e1e", "#1e3cdc"]
    assert layouts.reading_order({"bar": place(95, 63, 2, 123), "circle": place(30, 28, 12, 43)}) == ["circle", "bar"]
    # a row: centres between the lead's top and bottom rows are read left to right
    row = {"right": place(100, 30, 10, 50), "left": place(20, 45, 35, 55), "below": place(60, 90, 70, 110)}
    assert layouts.reading_order(row) == ["left", "right", "below"]


def place(x, y, top, bottom, area=100):
    from comfyui_eligen.core.regions import Region

    return Region(0, area, float(x), float(y), top, bottom)


def test_an_ambiguous_order_asks_for_a_legend_and_a_legend_by_name_resolves_it():
    # the blue square's centre lies on the red square's bottom row: one row (blue first) or two is a guess
    shapes = [((220, 30, 30), "rectangle", (60, 10, 100, 41)), ((30, 60, 220), "rectangle", (10, 30, 40, 51)),
              ((40, 180, 60), "rectangle", (90, 90, 120, 120))]
    image, truth = painted(shapes)
    with pytest.raises(ValueError) as error:
        layouts.painted_layout(image, "red\nblue\ngreen")
    message = str(error.value)
    assert "the order of the colours is not clear from the picture" in message
    assert "#1e3cdc (centre x=24, y=40) comes before #dc1e1e (centre x=80, y=25)" in message and "swap them" in message
    assert message.endswith("gives now)\nblue: red\nred: blue\ngreen: green")  # the pairing reading order gives
    masks, prompts, colours = layouts.painted_layout(image, "blue: a blue square\nred: a red square\ngreen: a green bar")
    assert colours == ["#1e3cdc", "#dc1e1e", "#28b43c"] and prompts[0] == "a blue square"
    assert torch.equal(masks[0].bool()[~border(truth)], truth[1][~border(truth)])


def test_two_regions_of_one_colour_are_one_entity_placed_by_the_larger():
    red = (220, 30, 30)
    shapes = [(red, "rectangle", (8, 8, 48, 48)), ((30, 60, 220), "ellipse", (70, 10, 120, 50)),
              (red, "rectangle", (90, 100, 110, 120))]
    image, truth = painted(shapes)
    masks, prompts, colours = layouts.painted_layout(image, "two red squares\nblue circle")
    assert colours == ["#dc1e1e", "#1e3cdc"]
    away = ~border(truth)
    assert torch.equal(masks[0].bool()[away], (truth[0] | truth[2])[away])
    # two regions of one size: the colour has no single place, and here that decides the order
    shapes[2] = (red, "rectangle", (80, 80, 120, 120))
    image, _ = painted(shapes)
    with pytest.raises(ValueError, match=r"#dc1e1e \(centre x=2\d, y=2\d\) is painted as regions of about the same "
                                         r"size \(1600 and 1600 pixels; the other one has its centre at x=100, y=100\)"):
        layouts.painted_layout(image, "two red squares\nblue circle")


def test_alpha_values_out_of_range_and_a_high_minimum_area_each_get_their_own_message():
    image, truth = painted()
    opaque = torch.cat([image, torch.ones_like(image[..., :1])], dim=-1)
    assert layouts.painted_layout(opaque, PROMPTS)[2] == EXPECTED_COLOURS  # a fully opaque alpha is ignored
    see_through = opaque.clone()
    see_through[0, :, :32, 3] = 0.0
    with pytest.raises(ValueError, match=r"has an alpha channel and 25.0% of its pixels are transparent"):
        layouts.painted_layout(see_through, PROMPTS)
    with pytest.raises(ValueError, match=r"values up to 255: it looks like 8-bit numbers \(0 to 255\)"):
        layouts.painted_layout(image * 255.0, PROMPTS)
    with pytest.raises(ValueError, match=r"values from -2\.87\d* to 1; a ComfyUI IMAGE holds 0 to 1"):
        layouts.painted_layout(image * 4.0 - 3.0, PROMPTS)
    with pytest.raises(ValueError) as error:
        layouts.painted_layout(image, PROMPTS, min_share=0.4)
    assert ("only the background colour #ffffff has a region covering min_area_percent (40%) of the image; the "
            "largest region of each other colour is smaller: #1e3cdc (15.") in str(error.value)
    assert "#dc1e1e (6." in str(error.value)
    with pytest.raises(ValueError, match=r"3 prompt lines; .*; smaller than min_area_percent \(10%\), so no "
                                         r"entities: #dc1e1e \(6\.\d%\)"):
        layouts.painted_layout(image, PROMPTS, min_share=0.1)
    with pytest.raises(ValueError, match=r"line 1: colour #dc1e1e has no region covering min_area_percent \(10%\) "
                                         r"of the image \(its largest: 6\.\d%\), so it is no entity"):
        layouts.painted_layout(image, "#dc1e1e: r\n#1e3cdc: b\n#28b43c: g", min_share=0.1)
    with pytest.raises(ValueError, match=r"no colour has a region covering min_area_percent \(40%\)"):
        thirds = [((0, 0, 0), "rectangle", (0, 0, 42, 128)), ((30, 60, 220), "rectangle", (86, 0, 128, 128))]
        layouts.painted_layout(painted(thirds)[0], "a\nb\nc", min_share=0.4, background="none")


def test_connected_regions_match_scipy_on_random_label_maps():
    from scipy import ndimage  # ComfyUI's own dependency, used here only as the oracle

    from comfyui_eligen.core.regions import connected_regions

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (97, 131), generator=generator)
    labels[torch.rand(labels.shape, generator=generator) < 0.3] = -1
    ids = connected_regions(labels)
    assert (ids[labels < 0] == 0).all() and (ids[labels >= 0] > 0).all()
    for k in range(3):
        theirs, count = ndimage.label((labels == k).numpy())
        inside = (labels == k).numpy()
        pairs = set(zip(ids.numpy()[inside].tolist(), theirs[inside].tolist()))
        assert len(pairs) == count == len(set(ids.numpy()[inside].tolist()))


def test_boxes_in_pixels_and_fractions():
    masks, prompts, reading = layouts.boxes_layout("0, 0, 32, 16\n\n16 16 16 48", "top\nright", 64, 48)
    assert reading == ("line 1 (0, 0, 32, 16): read as pixels -> x 0..32, y 0..16 of 64x48 pixels\n"
                       "line 3 (16 16 16 48): read as pixels -> x 16..32, y 16..48 of 64x48 pixels")
    assert prompts == ["top", "right"]
    assert masks[0].sum() == 32 * 16 and masks[0, :16, :32].all()
    assert masks[1].sum() == 16 * 32 and masks[1, 16:48, 16:32].all()  # clipped at the bottom
    fractions, _, _ = layouts.boxes_layout("0, 0, 0.5, 1/3".replace("1/3", "0.3333"), "left", 64, 48)
    assert torch.equal(fractions[0], layouts.box_masks([(1, "", (0, 0, 32, 16))], 64, 48)[0])
    # all numbers at most 1: the whole image, and the output says so
    whole, _, reading = layouts.boxes_layout("0, 0, 1, 1", "everything", 64, 48)
    assert whole[0].all() and reading == ("line 1 (0, 0, 1, 1): read as fractions (units auto: every number is "
                                          "at most 1) -> x 0..64, y 0..48 of 64x48 pixels")
    # explicit units override auto
    pixels, _, reading = layouts.boxes_layout("0, 0, 1, 1", "dot", 64, 48, units="pixels")
    assert reading.endswith("read as pixels -> x 0..1, y 0..1 of 64x48 pixels")
    assert pixels[0].sum() == 1


def test_masks_past_the_memory_limit_are_refused_before_they_are_made():
    boxes = "\n".join(["0, 0, 0.5, 0.5"] * 16)
    with pytest.raises(ValueError) as error:
        layouts.boxes_layout(boxes, "\n".join(["x"] * 16), 16384, 16384)
    assert str(error.value).startswith("16 masks at 16384x16384 need 16.0 GiB (one float mask per entity at the "
                                       "image size); the limit is 1 GiB, e.g. 16 masks at 4096x4096.")
    assert "masks 4 times smaller on each side (4096x4096, the same aspect)" in str(error.value)
    layouts.check_mask_memory(16, 4096, 4096, "the image size")  # exactly the limit: allowed
    with pytest.raises(ValueError, match="17 masks at 4096x4096 need 1.1 GiB"):
        layouts.check_mask_memory(17, 4096, 4096, "the image size")


@pytest.mark.parametrize("boxes, prompts, message", [
    ("0, 0, 10, 10\n5, 5, 10", "a\nb", "line 2 ('5, 5, 10'): expected 4 numbers"),
    ("0, 0, 10, 10\n\n5, 5, ten, 10", "a\nb", "line 3 ('5, 5, ten, 10'): x, y, w, h must be numbers"),
    ("0, 0, 10, -4", "a", "line 1 ('0, 0, 10, -4'): the width and height must be positive"),
    ("0, 0, 10, nan", "a", "line 1 ('0, 0, 10, nan'): x, y, w, h must be finite"),
    ("1_0, 0, 10, 10", "a", "line 1 ('1_0, 0, 10, 10'): x, y, w, h must be numbers; '1_0' is not a plain decimal"),
    ("0, \u0661\u0660, 10, 10", "a", "'\u0661\u0660' is not a plain decimal number"),
    ("0, 0, \uff11\uff10, 10", "a", "'\uff11\uff10' is not a plain decimal number"),
    ("0, 0, 1e2, 0x10", "a", "'0x10' is not a plain decimal number"),
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
    more, box_masks, reading = EliGenBoxLayout.execute("0, 0, 0.5, 0.5", "a red circle", clip, 128, 128,
                                              previous=entities).result
    assert len(more) == 4 and more[:3] == entities and more[3].mask.sum() == 64 * 64
    with pytest.raises(ValueError, match="too many entities"):
        EliGenBoxLayout.execute("\n".join(["0, 0, 8, 8"] * 14), "\n".join(["x"] * 14), clip, 64, 64,
                                previous=entities)
