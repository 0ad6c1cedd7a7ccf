"""Toy-world nodes in a real ComfyUI: loader, layouts, stock sampling, EliGen Apply, placement metric."""

import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

from comfyui_eligen.lab import workflows
from comfyui_eligen.toyworld import data, score_card

pytestmark = pytest.mark.server


@pytest.mark.parametrize("family, condition", [("flux", "b"), ("qwen_image", "a")])
def test_toy_sampling_workflow_runs_and_reports_placement(comfy_server, family, condition):
    prefix = f"toytest_{family}"
    sampler = dict(workflows.SAMPLER, steps=3)
    graph = workflows.sampling_workflow(condition, count=2, layout_seed=5, family=family, prefix=prefix,
                                        sampler=sampler, weights="random", size=data.QUICK_SIZE)
    entry = comfy_server.run_workflow(graph)

    images = comfy_server.output_files({"outputs": {"8": entry["outputs"]["8"]}})  # SaveImage's
    assert len(images) == 2
    assert all(Image.open(path).size == (128, 128) for path in images)
    metric_ui = entry["outputs"]["9"]["text"][0]
    assert "mean IoU" in metric_ui and "entities" in metric_ui
    # the node shows its score as a picture too (frontends draw node images, not a node's preview text)
    [card] = comfy_server.output_files({"outputs": {"9": entry["outputs"]["9"]}})
    assert Image.open(card).size == (score_card.WIDTH, score_card.card_height())
    assert entry["outputs"]["12"]["text"] == [metric_ui]  # the template's Placement score node

    [report] = glob.glob(os.path.join(comfy_server.output_dir, prefix, f"{condition}_*_.json"))
    result = json.load(open(report))
    layouts = data.layouts("heldout", 5, 2, size=data.QUICK_SIZE)
    assert [[r["prompt"] for r in image] for image in result["images"]] == [[e.prompt for e in l.entities] for l in layouts]
    assert result["summary"]["entities"] == sum(len(l.entities) for l in layouts)


def test_example_workflow_a_runs_with_comfy_run(comfy_server, tmp_path):
    """The shipped API file, shortened (2 layouts, 4 steps) to keep the suite fast, through `comfy run`."""
    with open(os.path.join(workflows.EXAMPLES_DIR, "api", f"{workflows.TEMPLATE_NAMES['a']}.json")) as f:
        graph = json.load(f)
    graph["2"]["inputs"]["count"] = 2
    graph["6"]["inputs"]["steps"] = 4
    path = tmp_path / "toy_a_short.json"
    path.write_text(json.dumps(graph))
    entry = comfy_server.comfy_run(str(path))
    images = comfy_server.output_files({"outputs": {"8": entry["outputs"]["8"]}})  # SaveImage's
    assert len(images) == 2
    assert all(np.asarray(Image.open(p).convert("RGB")).shape == (data.SIZE, data.SIZE, 3) for p in images)
    assert "mean IoU" in entry["outputs"]["9"]["text"][0]


def _make_ui_module():
    import importlib.util

    path = os.path.join(workflows.REPO, "scripts", "make_ui_workflow.py")
    spec = importlib.util.spec_from_file_location("make_ui_workflow", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_toy_workflows_are_the_builder_graphs_and_ui_twins_agree(comfy_server):
    mk = _make_ui_module()
    object_info = comfy_server.object_info()
    for name, graph in workflows.all_workflows().items():
        with open(os.path.join(workflows.EXAMPLES_DIR, "api", f"{name}.json")) as f:
            assert json.load(f) == graph, f"{name}: run `scripts/toyworld.py workflows` to rewrite it"
        assert mk.check_api_graph(graph, object_info) == []
        with open(os.path.join(workflows.EXAMPLES_DIR, f"{name}.json")) as f:
            ui = json.load(f)
        assert mk.ui_to_api(ui, object_info) == mk.as_read_back(graph)
