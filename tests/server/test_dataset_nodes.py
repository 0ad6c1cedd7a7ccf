"""The dataset nodes inside a real ComfyUI server: a good folder, a bad folder, graph inputs."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from comfy_server import ServerError

pytestmark = pytest.mark.server


def write_folder(folder, bad=False):
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(np.full((48, 64, 3), 128, np.uint8)).save(os.path.join(folder, "a.png"))
    mask = np.zeros((48, 64), np.uint8)
    mask[:, :32] = 255
    Image.fromarray(mask).save(os.path.join(folder, "a_m0.png"))
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(os.path.join(folder, "small_mask.png"))
    items = [
        {"image": "a.png", "prompt": "a red circle", "eligen_entity_prompts": ["red circle"],
         "eligen_entity_masks": ["a_m0.png"]},
        {"image": "a.png", "prompt": "plain"},
    ]
    if bad:
        items += [
            {"image": "gone.png", "prompt": "x"},
            {"image": "a.png", "prompt": "y", "eligen_entity_prompts": ["z"], "eligen_entity_masks": ["small_mask.png"]},
        ]
    with open(os.path.join(folder, "metadata.json"), "w") as f:
        json.dump(items, f)


def summary_graph(dataset_node):
    return {"1": dataset_node, "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}


def preview_text(entry):
    return entry["outputs"]["2"]["text"][0]


def test_folder_node_reads_and_reports(comfy_server):
    write_folder(os.path.join(comfy_server.input_dir, "eligen_ds_good"))
    node = {"class_type": "EliGenDataset", "inputs": {"folder": "eligen_ds_good", "max_pixels": 1048576}}
    text = preview_text(comfy_server.run_workflow(summary_graph(node)))
    assert text.startswith("2 records from metadata.json of eligen_ds_good, 1 entity, 1 plain sample")
    assert "64x48 (2)" in text

    write_folder(os.path.join(comfy_server.input_dir, "eligen_ds_bad"), bad=True)
    node["inputs"]["folder"] = "eligen_ds_bad"
    with pytest.raises(ServerError) as info:
        comfy_server.run_workflow(summary_graph(node))
    message = str(info.value)
    assert "EliGenDataset" in message and "2 problems in metadata.json of eligen_ds_bad" in message
    assert "record 2 (gone.png): image 'gone.png' not found" in message
    assert "record 3 (a.png): mask 0 'small_mask.png' is 32x32 but the image is 64x48" in message


def test_from_images_node(comfy_server):
    graph = summary_graph({"class_type": "EliGenDatasetFromImages", "inputs": {
        "images": ["3", 0], "masks": ["4", 0], "prompts": "a red circle and a blue square",
        "entity_prompts": "red circle | blue square", "max_pixels": 1048576}})
    graph["3"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0}}
    graph["4"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 48}}
    with pytest.raises(ServerError) as info:  # one mask for two entity prompts
        comfy_server.run_workflow(graph)
    assert "entity_prompts name 2 entities (per image: 2) but 1 masks were given" in str(info.value)
    graph["1"]["inputs"]["entity_prompts"] = "red circle"
    text = preview_text(comfy_server.run_workflow(graph))
    assert text.startswith("1 record from 1 graph images, 1 entity, 0 plain samples")
