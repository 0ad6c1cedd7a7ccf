"""Synthetic entity dataset and placement metric (plain functions, no server)."""

import json
import math
import os

import numpy as np
import pytest

from comfyui_eligen.toyworld import data, files, metric
from comfyui_eligen.training.dataset import load_dataset


def test_layouts_are_deterministic_and_splits_never_share_a_layout():
    first = data.make_layout("train", 0, 5)
    again = data.make_layout("train", 0, 5)
    assert np.array_equal(first.image, again.image) and first.caption == again.caption
    train = {data.make_layout("train", 0, i).image.tobytes() for i in range(60)}
    heldout = {data.make_layout("heldout", 0, i).image.tobytes() for i in range(60)}
    assert not train & heldout
    assert len(train) == 60 and len(heldout) == 60


def test_layout_contents_match_captions_prompts_and_masks():
    counts = set()
    for i in range(40):
        layout = data.make_layout("heldout", 3, i)
        counts.add(len(layout.entities))
        colours = [e.colour for e in layout.entities]
        assert len(set(colours)) == len(colours)  # distinct colours: the metric tells entities apart by colour
        for entity in layout.entities:
            assert entity.prompt in layout.caption and entity.prompt == f"{entity.colour} {entity.shape}"
            # the mask is exactly where the entity's colour was drawn
            drawn = np.all(layout.image == data.PALETTE[entity.colour], axis=-1)
            assert np.array_equal(drawn, entity.mask) and entity.mask.sum() > 100
        masks = layout.masks
        assert masks.sum(axis=0).max() == 1  # no overlaps
        assert layout.caption.endswith(f"on a {layout.background} background")
    assert counts == {1, 2, 3, 4}


def test_write_dataset_is_read_by_the_dataset_loader(tmp_path):
    path = data.write_dataset(str(tmp_path), 6, seed=1, split="train")
    records = json.load(open(path))
    assert [r["image"] for r in records] == [f"images/{i:05d}.png" for i in range(6)]
    dataset = load_dataset(str(tmp_path))
    assert len(dataset.records) == 6
    for i, record in enumerate(dataset.records):
        layout = data.make_layout("train", 1, i)
        assert record.prompt == layout.caption
        assert record.entity_prompts == [e.prompt for e in layout.entities]
        for entity, expected in zip(record.entities, layout.entities):
            assert np.array_equal(entity.load_mask(), expected.mask)
        assert np.array_equal(record.load_image(), layout.image)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]  # atomic writes left no temp files


def test_metric_on_exact_shifted_and_blank_images():
    layout = next(l for l in (data.make_layout("heldout", 0, i) for i in range(50)) if len(l.entities) == 2)
    prompts = [e.prompt for e in layout.entities]
    exact = metric.score_image(layout.image, layout.masks, prompts)
    assert all(r["iou"] == 1.0 and r["leak"] == 0.0 and r["success"] and not r["missing"] for r in exact)

    # Move everything 6 pixels right: IoU and leak follow from the overlap of each mask with its shift.
    shifted = np.roll(layout.image, 6, axis=1)
    for result, entity in zip(metric.score_image(shifted, layout.masks, prompts), layout.entities):
        moved = np.roll(entity.mask, 6, axis=1)
        overlap = (moved & entity.mask).sum()
        assert result["iou"] == pytest.approx(overlap / (moved | entity.mask).sum())
        assert result["leak"] == pytest.approx(1 - overlap / moved.sum())

    blank = np.full_like(layout.image, 128)
    results = metric.score_image(blank, layout.masks, prompts)
    assert all(r["iou"] == 0.0 and r["missing"] and math.isnan(r["leak"]) for r in results)
    summary = metric.summarise(exact + results)
    assert summary["mean_iou"] == pytest.approx(0.5) and summary["success_rate"] == pytest.approx(0.5)


def test_metric_accepts_float_images_and_small_masks():
    layout = data.make_layout("heldout", 0, 1)
    image = layout.image.astype(np.float32) / 255.0
    small_masks = layout.masks[:, ::2, ::2]  # masks at another resolution are resized (nearest)
    results = metric.score_image(image, small_masks, [e.prompt for e in layout.entities])
    assert all(r["iou"] > 0.9 for r in results)


def test_metric_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="'big shape'.*none"):
        metric.colour_of("big shape")
    with pytest.raises(ValueError, match="'red and blue square'"):
        metric.colour_of("red and blue square")
    layout = data.make_layout("heldout", 0, 0)
    with pytest.raises(ValueError, match="image 1: .*masks but"):
        metric.score_images([layout.image] * 2, [layout.masks, layout.masks[:0]], [[e.prompt for e in layout.entities]] * 2)

    data.write_dataset(str(tmp_path / "set"), 1, split="heldout")
    records = json.load(open(tmp_path / "set" / "metadata.json"))
    records[0]["eligen_entity_masks"][0] = "../../outside.png"
    json.dump(records, open(tmp_path / "set" / "metadata.json", "w"))
    (tmp_path / "images").mkdir()
    files.save_png(layout.image, str(tmp_path / "images" / "0.png"))
    with pytest.raises(ValueError, match="record 0: mask '../../outside.png' lies outside"):
        metric.score_folder(str(tmp_path / "images"), str(tmp_path / "set"))


def test_metric_script_scores_a_folder(tmp_path):
    data.write_dataset(str(tmp_path / "set"), 3, split="heldout")
    (tmp_path / "gen").mkdir()
    for i in range(3):  # "generated" = the exact layouts, so every entity succeeds
        files.save_png(data.make_layout("heldout", 0, i).image, str(tmp_path / "gen" / f"{i:03d}.png"))
    metric.main([str(tmp_path / "gen"), str(tmp_path / "set"), "--json", str(tmp_path / "out.json")])
    result = json.load(open(tmp_path / "out.json"))
    assert result["summary"]["mean_iou"] == 1.0 and len(result["images"]) == 3
