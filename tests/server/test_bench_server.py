"""The test bench itself: a real ComfyUI server loads this package, runs graphs, and reports failures."""

import json
import os
import shutil

import pytest
from PIL import Image

from comfy_server import REPO, ComfyServer, ServerError, expected_node_ids

pytestmark = pytest.mark.server

CATEGORY_ROOT = "EliGen"


def toy_text_to_image_graph(width=128, height=96, prefix="eligen_bench"):
    """The smallest graph through an EliGen node: toy models + stock encode, sample, decode, save."""
    return {
        "1": {"class_type": "EliGenToyModelLoader", "inputs": {"family": "flux", "weights": "random", "seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red circle"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 0, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def test_every_eligen_node_is_served_with_tooltips_and_category(comfy_server):
    expected = expected_node_ids()
    assert expected, "the package defines no nodes"
    info = comfy_server.object_info()
    served = {node_id for node_id in info if node_id.startswith(CATEGORY_ROOT)}
    assert served == set(expected)
    problems = []
    for node_id in sorted(served):
        node = info[node_id]
        if node["category"].split("/")[0] != CATEGORY_ROOT:
            problems.append(f"{node_id}: category {node['category']!r} is outside {CATEGORY_ROOT}/")
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                if not str(options.get("tooltip", "")).strip():
                    problems.append(f"{node_id} ({expected[node_id]}): input {name!r} has no tooltip")
    assert not problems, "\n".join(problems)


def test_comfy_run_executes_a_graph_with_an_eligen_node(comfy_server, tmp_path):
    workflow = tmp_path / "toy_text_to_image.json"
    workflow.write_text(json.dumps(toy_text_to_image_graph(width=128, height=96)))

    entry = comfy_server.comfy_run(str(workflow), timeout=300)

    (png,) = comfy_server.output_files(entry)
    assert os.path.basename(png).startswith("eligen_bench") and png.endswith(".png")
    with Image.open(png) as image:
        assert image.size == (128, 96) and image.mode == "RGB"
        low, high = zip(*image.getextrema())
    assert max(high) > min(low), "the decoded image is one flat colour"


def test_run_workflow_names_the_node_that_fails(comfy_server):
    # A LoRA file that is not safetensors: validation passes (the file is listed), execution fails.
    bad_lora = os.path.join(comfy_server.models_dir, "loras", "not_a_lora.safetensors")
    with open(bad_lora, "wb") as f:
        f.write(b"this is not a safetensors file")
    graph = toy_text_to_image_graph()
    graph["8"] = {"class_type": "LoraLoaderModelOnly",
                  "inputs": {"model": ["1", 0], "lora_name": "not_a_lora.safetensors", "strength_model": 1.0}}
    graph["5"]["inputs"]["model"] = ["8", 0]
    with pytest.raises(ServerError, match=r"node 8 \(LoraLoaderModelOnly\)"):
        comfy_server.run_workflow(graph, timeout=120)

    # Out of range: ComfyUI rejects the graph before running it (it does not check schema-style combos).
    graph["1"]["inputs"]["seed"] = -1
    with pytest.raises(ServerError, match=r"rejected[\s\S]*node 1 \(EliGenToyModelLoader\).*seed"):
        comfy_server.queue(graph)


def test_import_check_reports_a_broken_node_module(tmp_path):
    expected = expected_node_ids()
    broken_module = expected[sorted(expected)[0]]  # e.g. "nodes/toyworld.py"
    copy = tmp_path / "comfyui_eligen"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".*", "__pycache__", "out", "demo_out"))
    path = copy / broken_module
    path.write_text('raise ImportError("deliberately broken by the bench test")\n' + path.read_text())

    server = ComfyServer(custom_nodes={"comfyui_eligen": str(copy)}, log_path=str(tmp_path / "server.log"))
    try:
        server.start()
        with pytest.raises(ServerError) as failure:
            server.check_nodes_loaded(expected)
    finally:
        server.stop()
    message = str(failure.value)
    assert "IMPORT FAILED" in message
    assert f"{broken_module} fails to import: ImportError: deliberately broken by the bench test" in message
    # only the broken file is blamed (other node modules fail only if they import it)
    blamed = [line for line in message.splitlines() if "fails to import" in line]
    assert blamed and all(line.endswith(f"at {broken_module}:1") for line in blamed), message
    assert sorted(expected)[0] in message  # the missing node id is named too
