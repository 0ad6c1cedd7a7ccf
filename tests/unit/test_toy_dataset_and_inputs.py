"""What makes the toy templates run on the first Run, as plain functions: the toy training set that EliGen
Toy Dataset writes into ComfyUI's input folder (written once, reused, rewritten for other settings, never
written into a user's folder), the folder names it accepts, and the example picture the package copies
into the input folder at start-up (never over a user's file)."""

import json
import logging
import os

import pytest
from PIL import Image

from comfyui_eligen.nodes.toyworld import toy_dataset_path
from comfyui_eligen.toyworld import data, example_inputs
from comfyui_eligen.training.dataset import load_dataset

SIZE = 64


def test_toy_dataset_is_written_once_and_read_like_any_dataset(tmp_path):
    folder = str(tmp_path / "eligen_toy_train")
    assert data.ensure_dataset(folder, 6, seed=1, size=SIZE) is True
    dataset = load_dataset(folder, max_pixels=SIZE * SIZE)
    assert len(dataset) == 6
    expected = [layout.caption for layout in data.layouts("train", 1, 6, size=SIZE)]
    assert [record.prompt for record in dataset.records] == expected
    stamp = os.stat(os.path.join(folder, "metadata.json")).st_mtime_ns
    assert data.ensure_dataset(folder, 6, seed=1, size=SIZE) is False  # the same set: nothing written
    assert os.stat(os.path.join(folder, "metadata.json")).st_mtime_ns == stamp


def test_other_settings_rewrite_the_set_and_drop_files_it_no_longer_names(tmp_path):
    folder = str(tmp_path / "toy")
    data.ensure_dataset(folder, 5, seed=0, size=SIZE)
    assert data.ensure_dataset(folder, 2, seed=3, size=SIZE) is True
    with open(os.path.join(folder, "metadata.json")) as f:
        records = json.load(f)
    named = {record["image"] for record in records} | {m for record in records for m in record["eligen_entity_masks"]}
    on_disk = {f"{sub}/{name}" for sub in ("images", "masks") for name in os.listdir(os.path.join(folder, sub))}
    assert on_disk == named
    assert [r["prompt"] for r in records] == [layout.caption for layout in data.layouts("train", 3, 2, size=SIZE)]


def test_a_users_folder_is_never_written_into(tmp_path):
    folder = tmp_path / "my_data"
    folder.mkdir()
    (folder / "metadata.json").write_text("[]")
    with pytest.raises(data.ToyDatasetError, match=f"dataset folder {folder} already holds files"):
        data.ensure_dataset(str(folder), 3, size=SIZE)
    assert sorted(os.listdir(folder)) == ["metadata.json"]
    assert (folder / "metadata.json").read_text() == "[]"


def test_an_interrupted_write_is_redone(tmp_path):
    folder = str(tmp_path / "toy")
    data.ensure_dataset(folder, 3, size=SIZE)
    marker = os.path.join(folder, data.TOY_DATASET_MARKER)
    with open(marker) as f:
        settings = json.load(f)
    with open(marker, "w") as f:  # as a write killed between the first marker and the last one leaves it
        json.dump(dict(settings, complete=False), f)
    assert data.ensure_dataset(folder, 3, size=SIZE) is True
    with open(marker) as f:
        assert json.load(f)["complete"] is True


@pytest.mark.parametrize("name", ["", "  ", "/tmp/x", "../outside", "a/../../b", "a//b", ".", "./x"])
def test_folder_names_that_leave_the_input_folder_are_refused(name):
    with pytest.raises(ValueError, match="give a folder name inside ComfyUI's input directory") as error:
        toy_dataset_path(name)
    assert repr(name) in str(error.value)


def test_folder_names_inside_the_input_folder_are_taken():
    path = toy_dataset_path(" toy/sets/eligen_toy_train/ ")
    assert path.endswith(os.path.join("toy", "sets", "eligen_toy_train"))
    assert os.path.isabs(path)


def test_example_picture_is_copied_once_and_never_over_a_users_file(tmp_path):
    source = tmp_path / "inputs"
    source.mkdir()
    Image.new("RGB", (8, 8), "red").save(source / "painted.png")
    (source / "notes.txt").write_text("not a picture")
    target = tmp_path / "input"
    assert example_inputs.provide_example_inputs(str(target), str(source)) == ["painted.png"]
    assert sorted(os.listdir(target)) == ["painted.png"]
    assert Image.open(target / "painted.png").getpixel((0, 0)) == (255, 0, 0)
    Image.new("RGB", (8, 8), "blue").save(target / "painted.png")  # the user's own picture of that name
    assert example_inputs.provide_example_inputs(str(target), str(source)) == []
    assert Image.open(target / "painted.png").getpixel((0, 0)) == (0, 0, 255)


def test_the_shipped_example_picture_is_offered(tmp_path):
    copied = example_inputs.provide_example_inputs(str(tmp_path))
    assert "eligen_toy_painted_layout.png" in copied
    assert (tmp_path / "eligen_toy_painted_layout.png").read_bytes() == open(
        os.path.join(example_inputs.EXAMPLE_INPUTS, "eligen_toy_painted_layout.png"), "rb").read()


def test_an_unwritable_input_folder_gets_a_warning_not_a_failed_start(tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a folder under a file cannot be made, whoever runs this (root too)
    with caplog.at_level(logging.WARNING, logger="comfyui_eligen"):
        assert example_inputs.provide_example_inputs(str(blocker / "input")) == []
    assert "could not copy the example picture eligen_toy_painted_layout.png" in caplog.text
