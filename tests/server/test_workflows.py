"""UI-format workflow generator (scripts/make_ui_workflow.py) and the example workflows, checked against a
running ComfyUI's /object_info (the example graphs are validated, not run: the real models are not here)."""

import glob
import importlib.util
import json
import os

import pytest

from comfyui_eligen.lab.workflows import TEMPLATE_NAMES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(REPO, "example_workflows")
# The real-model templates (FLUX.1-dev, Qwen-Image): every example but the toy world's.
EXAMPLE_NAMES = sorted({os.path.basename(p)[:-5] for p in glob.glob(os.path.join(EXAMPLES, "*.json"))}
                       - set(TEMPLATE_NAMES.values()))


def load_script():
    spec = importlib.util.spec_from_file_location("make_ui_workflow", os.path.join(REPO, "scripts", "make_ui_workflow.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mk = load_script()


@pytest.fixture(scope="module")
def object_info(comfy_server):
    """/object_info of the session's real ComfyUI (this package loaded)."""
    return comfy_server.object_info()


def load_example(name):
    with open(os.path.join(EXAMPLES, "api", f"{name}.json")) as f:
        api = json.load(f)
    with open(os.path.join(EXAMPLES, f"{name}.json")) as f:
        ui = json.load(f)
    return api, ui


# Covers: seeds (control_after_generate), an image picker (upload value), an omitted optional widget
# (gets its default), a widget fed by a link, a second output slot, a node title, string ids.
GRAPH = {
    "1": {"class_type": "EmptySD3LatentImage", "inputs": {"width": ["9", 0], "height": 768, "batch_size": 1}},
    "2": {"class_type": "LoadImage", "inputs": {"image": "layout.png"}, "_meta": {"title": "Layout"}},
    "3": {"class_type": "KSampler", "inputs": {
        "model": ["4", 0], "seed": 42, "steps": 12, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["5", 0], "negative": ["5", 0], "latent_image": ["1", 0], "denoise": 1.0}},
    "4": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
    "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox on a rock", "clip": ["6", 0]}},
    "6": {"class_type": "CLIPLoader", "inputs": {"clip_name": "t5.safetensors", "type": "qwen_image"}},
    "7": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["8", 0]}},
    "8": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
    "9": {"class_type": "PrimitiveInt", "inputs": {"value": 1024}},
    "10": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 1]}},
    "layout_view": {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}},
    "11": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "eligen"}},
}


def test_api_to_ui_links_and_widgets_reproduce_the_graph(object_info):
    ui = mk.api_to_ui(GRAPH, object_info, notes=["# notes"])
    assert ui["version"] == 0.4
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(GRAPH) + 1 and nodes[ui["last_node_id"]]["type"] == "MarkdownNote"
    ids = {key: (int(key) if key.isdigit() else None) for key in GRAPH}
    ids["layout_view"] = next(n["id"] for n in ui["nodes"] if n["type"] == "PreviewImage")
    # Every link is one API connection and every API connection is one link, with the output's type.
    connections = {(ids[src], slot, ids[dst], name) for dst, node in GRAPH.items()
                   for name, (src, slot) in ((k, v) for k, v in node["inputs"].items() if isinstance(v, list))}
    found = set()
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        slot = nodes[dst]["inputs"][dst_slot]
        assert slot["link"] == link_id and link_id in nodes[src]["outputs"][src_slot]["links"]
        assert kind == object_info[nodes[src]["type"]]["output"][src_slot]
        found.add((src, src_slot, dst, slot["name"]))
    assert found == connections
    # Widget values in the node's widget order, with the frontend's extra values.
    assert nodes[3]["widgets_values"] == [42, "fixed", 12, 1.0, "euler", "simple", 1.0]
    assert nodes[2]["widgets_values"] == ["layout.png", "image"] and nodes[2]["title"] == "Layout"
    assert nodes[6]["widgets_values"] == ["t5.safetensors", "qwen_image", "default"]
    assert nodes[1]["inputs"] == [{"name": "width", "type": "INT", "link": nodes[1]["inputs"][0]["link"],
                                   "widget": {"name": "width"}}]
    # Columns follow dependency depth: every link goes left to right.
    for _, src, _, dst, _, _ in ui["links"]:
        assert nodes[src]["pos"][0] < nodes[dst]["pos"][0]
    # And back: the UI workflow queues the same graph (the omitted optional widget now has its default).
    back = mk.ui_to_api(ui, object_info)
    expected = json.loads(json.dumps(GRAPH))
    expected["6"]["inputs"]["device"] = "default"
    expected[str(ids["layout_view"])] = expected.pop("layout_view")
    for node in expected.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and value[0] == "layout_view":
                value[0] = str(ids["layout_view"])
    assert back == expected


def test_check_api_graph_names_each_problem(object_info):
    assert mk.check_api_graph(GRAPH, object_info) == []
    bad = json.loads(json.dumps(GRAPH))
    bad["3"]["inputs"]["positive"] = ["8", 0]          # a VAE into a CONDITIONING input
    del bad["3"]["inputs"]["steps"]                     # a required input missing
    bad["5"]["inputs"]["clip"] = ["99", 0]             # a link to a node that is not there
    bad["6"]["inputs"]["type"] = "not_a_type"           # a combo value outside its options
    bad["7"]["inputs"]["vae"] = ["4", 3]                # an output slot that does not exist
    bad["12"] = {"class_type": "NoSuchNode", "inputs": {}}
    problems = "\n".join(mk.check_api_graph(bad, object_info))
    for text in ["node 3 (KSampler): input 'positive' (CONDITIONING) is linked to a VAE output",
                 "node 3 (KSampler): required input 'steps' is missing",
                 "node 5 (CLIPTextEncode): input 'clip' links to node 99",
                 "node 6 (CLIPLoader): 'type' = 'not_a_type' is not one of",
                 "node 7 (VAEDecode): input 'vae' links to output 3 of node 4",
                 "node 12: type 'NoSuchNode' is not installed"]:
        assert text in problems


def test_script_command_line(object_info, tmp_path):
    api_path, info_path, out_path = tmp_path / "api.json", tmp_path / "info.json", tmp_path / "ui.json"
    api_path.write_text(json.dumps(GRAPH))
    info_path.write_text(json.dumps(object_info))
    mk.main([str(api_path), str(out_path), "--object-info", str(info_path)])
    assert mk.ui_to_api(json.loads(out_path.read_text()), object_info)["3"] == GRAPH["3"]
    broken = dict(GRAPH, **{"3": {"class_type": "KSampler", "inputs": {}}})
    api_path.write_text(json.dumps(broken))
    with pytest.raises(SystemExit, match="required input 'model' is missing"):
        mk.main([str(api_path), str(tmp_path / "other.json"), "--object-info", str(info_path)])
    assert not (tmp_path / "other.json").exists()


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_workflow_is_valid_and_its_twins_agree(object_info, name):
    api, ui = load_example(name)
    assert mk.check_api_graph(api, object_info) == []
    types = {node["class_type"] for node in api.values()}
    assert {"EliGenEntity", "EliGenApply", "EliGenPreviewEntities", "KSampler", "SaveImage"} <= types
    assert types & {"LoraLoaderModelOnly", "EliGenLoraLoader", "EliGenTrain"}  # a released LoRA, or one trained in the graph
    # The UI workflow queues exactly the API twin (titles aside, model links only in the UI file).
    strip = {key: {"class_type": node["class_type"], "inputs": node["inputs"]} for key, node in api.items()}
    queued = {key: {"class_type": node["class_type"], "inputs": node["inputs"]}
              for key, node in mk.ui_to_api(ui, object_info).items()}
    assert queued == strip
    # Every model file the graph names comes with a download link in the UI file.
    listed = {m["name"] for node in ui["nodes"] for m in node.get("properties", {}).get("models", [])}
    named = {v for node in api.values() for v in node["inputs"].values()
             if isinstance(v, str) and v.endswith(".safetensors")}
    assert named and named <= listed
    assert any(node["type"] == mk.NOTE_TYPE for node in ui["nodes"])


LOADERS = {"UNETLoader", "DualCLIPLoader", "CLIPLoader", "VAELoader", "LoraLoaderModelOnly", "EliGenLoraLoader"}


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_workflow_passes_comfyui_own_validation(comfy_server, name):
    """With empty stand-ins for the model files, ComfyUI accepts the graph (its /prompt validation) and
    the run stops only where a loader reads a stand-in."""
    from comfy_server import ServerError

    api, _ = load_example(name)
    placeholders = []
    for node in api.values():
        for model in node.get("_meta", {}).get("models", []):
            path = os.path.join(comfy_server.models_dir, model["directory"], model["name"])
            if not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                open(path, "wb").close()
                placeholders.append(path)
    try:
        prompt_id = comfy_server.queue(api)  # raises with ComfyUI's node errors if the graph is invalid
        with pytest.raises(ServerError) as error:
            comfy_server.wait(prompt_id, timeout=120)
    finally:
        for path in placeholders:
            os.unlink(path)
    failed_in = str(error.value).split("failed in node ", 1)[1].split(")")[0]
    assert failed_in.split("(")[1] in LOADERS, str(error.value)
