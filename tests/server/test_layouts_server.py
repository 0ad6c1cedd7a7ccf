"""The painted-layout node in a real ComfyUI on the toy world: a layout painted with soft edges, read by
EliGen Painted Layout and sampled with a trained EliGen LoRA, puts each entity where it was painted far
better than the base model with the same layout."""

import glob
import json
import os

import pytest

from comfyui_eligen.lab import painted
from comfyui_eligen.lab.evaluate import SAMPLER
from comfyui_eligen.toyworld import data
from toy_lora import trained_toy_lora

pytestmark = pytest.mark.server
MARGIN_IOU = 0.2


def run_painted(server, layout, lora_name, prefix):
    graph = painted.painted_workflow(layout, lora_name=lora_name, batch_size=4, seed=7, prefix=prefix,
                                     sampler=dict(SAMPLER, steps=10))
    entry = server.run_workflow(graph)
    name = "painted_lora" if lora_name else "painted_base"
    [report] = glob.glob(os.path.join(server.output_dir, prefix, f"{name}_*_.json"))
    with open(report) as f:
        return entry, json.load(f)


def test_painted_layout_with_trained_lora_places_entities(comfy_server):
    layout = painted.example_layout(size=data.QUICK_SIZE)  # the size the shared test LoRA trained at
    painted.paint(layout).save(os.path.join(comfy_server.input_dir, painted.LAYOUT_FILE))
    lora = trained_toy_lora(comfy_server)

    entry, trained = run_painted(comfy_server, layout, lora, "painted_test")
    _, base = run_painted(comfy_server, layout, None, "painted_test")

    # the node read exactly the painted entities, paired with the prompts in reading order
    assert [[r["prompt"] for r in image] for image in trained["images"]] == [painted.prompts_in_reading_order(layout)] * 4
    assert len(comfy_server.output_files(entry)) >= 4
    d, b = trained["summary"], base["summary"]
    print(f"painted, base + EliGen attention: {b}\npainted, trained LoRA: {d}")
    assert d["mean_iou"] > b["mean_iou"] + MARGIN_IOU
    assert d["success_rate"] > b["success_rate"]


def test_shipped_painted_workflow_is_the_builder_graph(comfy_server):
    import importlib.util

    import numpy as np
    from PIL import Image

    spec = importlib.util.spec_from_file_location(
        "make_ui_workflow", os.path.join(painted.EXAMPLES_DIR, "..", "scripts", "make_ui_workflow.py"))
    make_ui = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_ui)
    layout = painted.example_layout()
    graph = painted.painted_workflow(layout)
    with open(os.path.join(painted.EXAMPLES_DIR, "api", f"{painted.NAME}.json")) as f:
        assert json.load(f) == graph, "run `scripts/toyworld.py workflows` to rewrite it"
    object_info = comfy_server.object_info()
    assert make_ui.check_api_graph(graph, object_info) == []
    with open(os.path.join(painted.EXAMPLES_DIR, f"{painted.NAME}.json")) as f:
        ui = json.load(f)
    assert make_ui.ui_to_api(ui, object_info) == make_ui.as_read_back(graph)
    shipped = np.asarray(Image.open(os.path.join(painted.EXAMPLES_DIR, "inputs", painted.LAYOUT_FILE)).convert("RGB"))
    assert np.array_equal(shipped, np.asarray(painted.paint(layout)))


def box_graph(boxes):
    """Boxes as text -> EliGen Apply -> stock KSampler, and EliGen Preview Entities on an empty canvas."""
    return {
        "1": {"class_type": "EliGenToyModelLoader", "inputs": {"family": "flux", "weights": "pretrained", "seed": 0}},
        "2": {"class_type": "EliGenBoxLayout", "inputs": {
            "boxes": boxes, "prompts": "red circle\nblue square", "clip": ["1", 1], "width": 128, "height": 128,
            "units": "auto", "text_length": "real_length"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle and a blue square", "clip": ["1", 1]}},
        "4": {"class_type": "EliGenApply", "inputs": {"model": ["1", 0], "positive": ["3", 0], "entities": ["2", 0]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": 1, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["4", 1], "negative": ["4", 2], "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "boxes_test/out"}},
        "9": {"class_type": "EmptyImage", "inputs": {"width": 128, "height": 128, "batch_size": 1, "color": 0}},
        "10": {"class_type": "EliGenPreviewEntities", "inputs": {
            "image": ["9", 0], "entities": ["2", 0], "opacity": 0.5, "labels": False}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "boxes_test/preview"}},
    }


def test_box_layout_feeds_apply_and_preview_and_names_bad_lines(comfy_server):
    import numpy as np
    from PIL import Image

    from comfy_server import ServerError

    entry = comfy_server.run_workflow(box_graph("0, 0, 0.5, 0.5\n0.5, 0.5, 0.5, 0.5"))
    [preview] = [p for p in comfy_server.output_files(entry) if "preview_" in os.path.basename(p)]
    drawn = np.asarray(Image.open(preview).convert("RGB")).astype(int)
    # the preview tints each box (and nothing outside them) on the black canvas
    assert drawn[10:50, 10:50].sum() > 0 and drawn[80:120, 80:120].sum() > 0
    assert drawn[10:50, 80:120].sum() == 0 and drawn[80:120, 10:50].sum() == 0
    assert len([p for p in comfy_server.output_files(entry) if os.path.basename(p).startswith("out_")]) == 1
    with pytest.raises(ServerError, match=r"line 2 \('0.5, 0.5, 0.5'\): expected 4 numbers"):
        comfy_server.run_workflow(box_graph("0, 0, 0.5, 0.5\n0.5, 0.5, 0.5"))
