"""Dataset records: validation messages, the reference resize rule, aspect buckets, graph-input datasets."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_eligen.training.dataset import (
    DatasetError,
    dataset_from_images,
    load_dataset,
    parse_entity_prompts,
    prepare_image,
    prepare_masks,
    read_mask,
    target_size,
)


def save_image(path, width, height, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def save_mask(path, width, height, box, mode="L"):
    """White rectangle box=(left, top, right, bottom) on black."""
    array = np.zeros((height, width), np.uint8)
    left, top, right, bottom = box
    array[top:bottom, left:right] = 255
    Image.fromarray(array).convert(mode).save(path)


def write_metadata(folder, records, jsonl=False):
    if jsonl:
        with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    else:
        with open(os.path.join(folder, "metadata.json"), "w") as f:
            json.dump(records, f)


def record(image, prompt="a scene", entities=()):
    item = {"image": image, "prompt": prompt}
    if entities:
        item["eligen_entity_prompts"] = [p for p, _ in entities]
        item["eligen_entity_masks"] = [m for _, m in entities]
    return item


@pytest.fixture
def good_folder(tmp_path):
    """Three records: two with entities (two sizes), one plain; JSON format."""
    save_image(tmp_path / "a.png", 64, 48, seed=1)
    save_mask(tmp_path / "a_m0.png", 64, 48, (0, 0, 32, 48))
    save_mask(tmp_path / "a_m1.png", 64, 48, (32, 0, 64, 48), mode="RGB")
    save_image(tmp_path / "b.png", 48, 64, seed=2)
    save_mask(tmp_path / "b_m0.png", 48, 64, (8, 8, 40, 40), mode="RGBA")
    save_image(tmp_path / "c.png", 64, 48, seed=3)
    write_metadata(tmp_path, [
        record("a.png", "left and right", [("a red circle", "a_m0.png"), ("a blue square", "a_m1.png")]),
        record("b.png", "a box", [("a green triangle", "b_m0.png")]),
        record("c.png", "just a picture"),
        {"image": "c.png", "prompt": "", "eligen_entity_prompts": [], "eligen_entity_masks": []},
    ])
    return tmp_path


def problems_of(folder, **kwargs):
    with pytest.raises(DatasetError) as info:
        load_dataset(str(folder), **kwargs)
    return info.value.problems, str(info.value)


# ---------------------------------------------------------------------------------------------------
# Good data


def test_load_good_folder_with_plain_record(good_folder):
    ds = load_dataset(str(good_folder))
    assert len(ds) == 4
    assert [len(r.entities) for r in ds.records] == [2, 1, 0, 0]  # missing keys or empty lists: plain
    assert ds.records[0].entity_prompts == ["a red circle", "a blue square"]
    assert ds.records[2].prompt == "just a picture"
    # A plain record prepares to an empty mask stack, not a crash.
    image, masks = prepare_image(ds.records[2], ds.bucket_of(2)), prepare_masks(ds.records[2], ds.bucket_of(2))
    assert image.shape == (3, 48, 64) and masks.shape == (0, 48, 64)
    # Masks in L, RGB and RGBA all read as white = inside.
    masks_a = prepare_masks(ds.records[0], ds.bucket_of(0))
    assert masks_a[0, :, :32].min() == 1 and masks_a[0, :, 32:].max() == 0
    assert masks_a[1, :, 32:].min() == 1 and masks_a[1, :, :32].max() == 0
    masks_b = prepare_masks(ds.records[1], ds.bucket_of(1))
    assert masks_b[0].sum() == 32 * 32


def test_jsonl_and_metadata_file_path(good_folder):
    items = json.loads((good_folder / "metadata.json").read_text())
    os.remove(good_folder / "metadata.json")
    write_metadata(good_folder, items, jsonl=True)
    by_folder = load_dataset(str(good_folder))
    by_file = load_dataset(str(good_folder / "metadata.jsonl"))
    assert [r.prompt for r in by_folder.records] == [i["prompt"] for i in items]
    assert [r.prompt for r in by_file.records] == [i["prompt"] for i in items]


def test_transparent_mask_pixels_are_outside(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere, but only the left half is opaque
    rgba[:, :4, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "m.png")
    mask = read_mask(str(tmp_path / "m.png"))
    assert mask[:, :4].all() and not mask[:, 4:].any()


# ---------------------------------------------------------------------------------------------------
# Bad data: every case names the record, the file and the reason


def test_missing_and_unreadable_files(tmp_path):
    save_image(tmp_path / "ok.png", 32, 32)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    save_image(tmp_path / "trunc.png", 64, 64)
    data = (tmp_path / "trunc.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    write_metadata(tmp_path, [
        record("missing.png"),
        record("broken.png"),
        record("ok.png", entities=[("a cat", "nomask.png")]),
        record("trunc.png"),
    ])
    problems, message = problems_of(tmp_path)
    assert len(problems) == 4
    assert "record 0 (missing.png): image 'missing.png' not found" in problems
    assert problems[1].startswith("record 1 (broken.png): image 'broken.png' cannot be read as an image")
    assert "record 2 (ok.png): mask 0 'nomask.png' not found" in problems
    assert problems[3].startswith("record 3 (trunc.png): image 'trunc.png' cannot be read")
    assert message.startswith("4 problems in metadata.json")


def test_mask_size_differs_names_both_sizes(tmp_path):
    save_image(tmp_path / "cat.png", 640, 480)
    save_mask(tmp_path / "m0.png", 640, 480, (0, 0, 10, 10))
    save_mask(tmp_path / "m1.png", 512, 512, (0, 0, 10, 10))
    write_metadata(tmp_path, [{"image": "x.png", "prompt": ""}] * 3 + [
        record("cat.png", entities=[("a cat", "m0.png"), ("a hat", "m1.png")])])
    problems, _ = problems_of(tmp_path)
    assert "record 3 (cat.png): mask 1 'm1.png' is 512x512 but the image is 640x480" in problems
    assert not any("m0.png" in p for p in problems)


def test_prompt_and_mask_counts_differ(tmp_path):
    save_image(tmp_path / "a.png", 32, 32)
    save_mask(tmp_path / "m.png", 32, 32, (0, 0, 8, 8))
    write_metadata(tmp_path, [
        {"image": "a.png", "prompt": "p", "eligen_entity_prompts": ["x", "y"], "eligen_entity_masks": ["m.png"]},
        {"image": "a.png", "prompt": "p", "eligen_entity_masks": ["m.png"]},
    ])
    problems, _ = problems_of(tmp_path)
    assert problems[0].startswith("record 0 (a.png): 2 entity prompts but 1 entity masks")
    assert problems[1].startswith("record 1 (a.png): 0 entity prompts but 1 entity masks")


def test_paths_that_leave_the_folder(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    save_image(tmp_path / "outside.png", 32, 32)
    save_image(root / "in.png", 32, 32)
    os.symlink(tmp_path / "outside.png", root / "link.png")
    os.symlink(tmp_path, root / "up")
    write_metadata(root, [
        record("../outside.png"),
        record(str(tmp_path / "outside.png")),
        record("link.png"),
        record("in.png", entities=[("x", "up/outside.png")]),
        record("sub/../in.png"),  # stays inside: fine
    ])
    problems, _ = problems_of(root)
    assert problems == [
        "record 0 (../outside.png): image path '../outside.png' leaves the dataset folder",
        f"record 1 ({tmp_path / 'outside.png'}): image path '{tmp_path / 'outside.png'}' is absolute; "
        "paths must be relative to the dataset folder",
        "record 2 (link.png): image path 'link.png' is a link that points outside the dataset folder",
        "record 3 (in.png): mask 0 path 'up/outside.png' is a link that points outside the dataset folder",
    ]


def test_keys_types_and_bad_jsonl_line(tmp_path):
    save_image(tmp_path / "a.png", 32, 32)
    lines = [
        json.dumps({"prompt": "no image"}),
        "{not json",
        json.dumps({"image": "a.png"}),
        json.dumps({"image": 5, "prompt": "p"}),
        json.dumps({"image": "a.png", "prompt": "p", "eligen_entity_prompts": "a cat", "eligen_entity_masks": []}),
        "",
        json.dumps(["a.png", "p"]),
        json.dumps({"image": "a.png", "prompt": 3}),
        json.dumps({"image": "a.png", "prompt": "fine"}),
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    problems, _ = problems_of(tmp_path)
    assert problems[0].startswith("record 1 (metadata.jsonl line 2): not valid JSON")
    assert "record 0: missing key 'image'" in problems
    assert "record 2 (a.png): missing key 'prompt'" in problems
    assert "record 3: 'image' must be a non-empty path string, got 5" in problems
    assert "record 4 (a.png): 'eligen_entity_prompts' must be a list of strings, got \"a cat\"" in problems
    assert "record 5: expected an object with 'image' and 'prompt', got list" in problems
    assert "record 6 (a.png): 'prompt' must be a string, got int" in problems
    assert len(problems) == 7  # the blank line is skipped, record 7 is fine


def test_folder_level_problems(tmp_path):
    _, message = problems_of(tmp_path / "nope")
    assert "dataset folder" in message and "not found" in message
    _, message = problems_of(tmp_path)
    assert "no metadata.json or metadata.jsonl" in message
    write_metadata(tmp_path, [])
    _, message = problems_of(tmp_path)
    assert "metadata.json has no records (the dataset is empty)" in message
    (tmp_path / "metadata.json").write_text('{"image": "a.png"}')
    _, message = problems_of(tmp_path)
    assert "metadata.json: expected a list of records, got dict" in message
    (tmp_path / "metadata.json").write_text('[{"image": "a.png",]')
    _, message = problems_of(tmp_path)
    assert "metadata.json: not valid JSON" in message and "line 1" in message
    write_metadata(tmp_path, [], jsonl=True)
    _, message = problems_of(tmp_path)
    assert "both metadata.json and metadata.jsonl" in message


def test_too_small_image_and_empty_entity_prompt(tmp_path):
    save_image(tmp_path / "thin.png", 300, 10)
    save_image(tmp_path / "a.png", 32, 32)
    save_mask(tmp_path / "m.png", 32, 32, (0, 0, 8, 8))
    write_metadata(tmp_path, [record("thin.png"), record("a.png", entities=[("  ", "m.png")])])
    problems, _ = problems_of(tmp_path)
    assert problems == [
        "record 1 (a.png): entity prompt 0 is empty",
        "record 0 (thin.png): image is 300x10; with max_pixels 1048576 a side falls below 16 px",
    ]


# ---------------------------------------------------------------------------------------------------
# Resize rule and buckets


@pytest.mark.parametrize("size,max_pixels,expected", [
    ((1080, 1920), 1024 * 1024, (768, 1360)),  # sqrt(1080*1920/2^20)=1.4062 -> 768.0, 1365.3 -> floor 16
    ((1024, 1024), 1024 * 1024, (1024, 1024)),  # at the limit: unchanged
    ((100, 70), 1024 * 1024, (96, 64)),  # small images are never enlarged, only floored
    ((3000, 1000), 262144, (880, 288)),
])
def test_target_size_follows_reference(size, max_pixels, expected):
    h, w = target_size(*size, max_pixels)
    assert (h, w) == expected
    assert h * w <= max_pixels and h % 16 == 0 and w % 16 == 0


def test_resize_and_crop_are_centred_and_masks_follow(tmp_path):
    # 200x100 image: left half red, right half blue; mask = right quarter. max_pixels 5000 -> 96x48.
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, :100, 0] = 255
    image[:, 100:, 2] = 255
    Image.fromarray(image).save(tmp_path / "im.png")
    save_mask(tmp_path / "m.png", 200, 100, (150, 0, 200, 100))
    write_metadata(tmp_path, [record("im.png", entities=[("right", "m.png")])])
    ds = load_dataset(str(tmp_path), max_pixels=5000)
    assert ds.bucket_of(0) == (48, 96)
    pixels, masks = prepare_image(ds.records[0], ds.bucket_of(0)), prepare_masks(ds.records[0], ds.bucket_of(0))
    assert pixels.shape == (3, 48, 96) and masks.shape == (1, 48, 96)
    assert pixels.min() >= 0 and pixels.max() <= 1
    # Scale = max(96/200, 48/100) = 0.48 -> 96x48 exactly: the colour border stays in the middle.
    assert pixels[0, :, :47].min() > 0.99 and pixels[2, :, 49:].min() > 0.99
    assert set(masks.unique().tolist()) == {0.0, 1.0}  # nearest: no grey values
    assert masks[0, :, 73:].min() == 1 and masks[0, :, :71].max() == 0


def test_crop_removes_equal_margins(tmp_path):
    # 96x70 -> 96x64: the cover scale is 1 (no resampling), 3 rows cropped at the top and 3 at the bottom.
    image = np.arange(70 * 96, dtype=np.int64).reshape(70, 96)
    rgb = np.stack([(image % 256), (image // 256), np.zeros_like(image)], -1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "im.png")
    write_metadata(tmp_path, [record("im.png")])
    ds = load_dataset(str(tmp_path))
    pixels = prepare_image(ds.records[0], ds.bucket_of(0))
    out = (pixels * 255).round().to(torch.int64)
    index = out[0] + 256 * out[1]
    assert torch.equal(index, torch.from_numpy(image[3:67]))


# ---------------------------------------------------------------------------------------------------
# Datasets from graph inputs


def graph_inputs(batch=2, height=32, width=48):
    images = torch.rand(batch, height, width, 3)
    masks = torch.zeros(3, height, width)
    masks[0, :, :24] = 1
    masks[1, :, 24:] = 1
    masks[2, :16] = 0.7
    return images, masks


def test_dataset_from_images_mapping():
    images, masks = graph_inputs()
    ds = dataset_from_images(images, masks, "first caption\nsecond caption", "red circle | blue square\ngreen cross")
    assert [r.prompt for r in ds.records] == ["first caption", "second caption"]
    assert [r.entity_prompts for r in ds.records] == [["red circle", "blue square"], ["green cross"]]
    assert ds.records[1].entities[0].mask[:16].all() and not ds.records[1].entities[0].mask[16:].any()
    pixels, prepared = prepare_image(ds.records[0], ds.bucket_of(0)), prepare_masks(ds.records[0], ds.bucket_of(0))
    assert torch.allclose(pixels, images[0].permute(2, 0, 1), atol=1 / 255)
    assert torch.equal(prepared, masks[:2])
    # shared prompt, no entities at all: plain samples
    plain = dataset_from_images(images, None, "one caption for all", "")
    assert [r.prompt for r in plain.records] == ["one caption for all"] * 2
    assert all(not r.entities for r in plain.records)
    assert [r.prompt for r in dataset_from_images(images, None, "", "").records] == ["", ""]
    # list forms and '-' for "none"
    assert parse_entity_prompts("a | b\n-\n\nc") == [["a", "b"], [], [], ["c"]]
    ds = dataset_from_images(images, masks[:1], ["x", "y"], [["only"], []])
    assert [len(r.entities) for r in ds.records] == [1, 0]


def test_dataset_from_images_errors():
    images, masks = graph_inputs()
    with pytest.raises(DatasetError) as info:
        dataset_from_images(images, masks, "a\nb\nc", "x | y\nz")
    assert "prompts: 3 prompts for 2 images" in str(info.value)
    with pytest.raises(DatasetError) as info:
        dataset_from_images(images, masks, "a", "x | y | z\nw")
    assert "entity_prompts name 4 entities (per image: 3, 1) but 3 masks were given" in str(info.value)
    with pytest.raises(DatasetError) as info:
        dataset_from_images(images, masks, "a", "x\ny\nz")
    assert "entity_prompts: 3 lines for 2 images" in str(info.value)
    with pytest.raises(DatasetError) as info:
        dataset_from_images(images, torch.zeros(3, 16, 16), "a", "x | y\nz")
    assert "masks are 16x16 but the images are 48x32" in str(info.value)
    with pytest.raises(DatasetError) as info:
        dataset_from_images(images, masks[:2], "a", "x | \nz |")
    assert info.value.problems == [  # all problems at once
        "entity_prompts name 4 entities (per image: 2, 2) but 2 masks were given; "
        "masks are taken in order, image 0's entities first",
        "record 0 (image 0 of the batch): entity prompt 1 is empty",
        "record 1 (image 1 of the batch): entity prompt 1 is empty",
    ]
    with pytest.raises(DatasetError) as info:
        dataset_from_images(images, masks[:3], "a", "x | \nz")
    assert info.value.problems == ["record 0 (image 0 of the batch): entity prompt 1 is empty"]
    with pytest.raises(DatasetError, match="images: expected an IMAGE batch"):
        dataset_from_images(torch.zeros(32, 32, 3), None, "a", "")


def test_exif_orientation_is_applied_before_the_size_check(tmp_path):
    # Stored 64x32 with "rotate 90" in EXIF: shown (and trained) as 32x64, like ComfyUI's LoadImage.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(tmp_path / "phone.jpg", exif=exif.tobytes())
    save_mask(tmp_path / "m.png", 32, 64, (0, 0, 16, 64))
    write_metadata(tmp_path, [record("phone.jpg", entities=[("left", "m.png")])])
    ds = load_dataset(str(tmp_path))
    assert ds.records[0].size == (64, 32) and ds.bucket_of(0) == (64, 32)
