"""The painted-layout node in a real ComfyUI on the toy world: a layout painted with soft edges, read by
EliGen Painted Layout and sampled with a trained EliGen LoRA, puts each entity where it was painted far
better than the base model with the same layout."""

import glob
import json
import os

import pytest

from comfyui_eligen.toyworld import painted
from comfyui_eligen.toyworld.evaluate import SAMPLER
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
    layout = painted.example_layout()
    painted.paint(layout).save(os.path.join(comfy_server.input_dir, painted.LAYOUT_FILE))
    lora = trained_toy_lora(comfy_server)

    entry, trained = run_painted(comfy_server, layout, lora, "painted_test")
    _, base = run_painted(comfy_server, layout, None, "painted_test")

    # the node read exactly the painted entities, paired with the prompts in raster order
    assert [[r["prompt"] for r in image] for image in trained["images"]] == [painted.prompts_in_raster_order(layout)] * 4
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
        assert json.load(f) == graph, "run toyworld.painted.write_example() and scripts/make_ui_workflow.py"
    object_info = comfy_server.object_info()
    assert make_ui.check_api_graph(graph, object_info) == []
    with open(os.path.join(painted.EXAMPLES_DIR, f"{painted.NAME}.json")) as f:
        ui = json.load(f)
    assert make_ui.ui_to_api(ui, object_info) == {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
                                                  for k, v in graph.items()}
    shipped = np.asarray(Image.open(os.path.join(painted.EXAMPLES_DIR, "inputs", painted.LAYOUT_FILE)).convert("RGB"))
    assert np.array_equal(shipped, np.asarray(painted.paint(layout)))
