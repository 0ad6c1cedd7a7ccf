"""What the frontend and API users see of every EliGen node (/object_info: inputs, defaults, limits,
tooltips, outputs) is unchanged: equal to a snapshot taken from the server before the training job and
its runner replaced the node's hand-written inputs (tests/data/object_info_eligen.json)."""

import json
import os

import pytest

SNAPSHOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "object_info_eligen.json")
# Inputs whose options list files on the server (they depend on what other tests put into models/).
FILE_LISTS = {("EliGenLoraLoader", "lora_name")}

pytestmark = pytest.mark.server


def without_file_lists(info):
    info = json.loads(json.dumps(info))
    for node, name in FILE_LISTS:
        for section in ("required", "optional"):
            spec = info.get(node, {}).get("input", {}).get(section, {}).get(name)
            if spec is not None:
                spec[1]["options"] = []
    return info


def test_every_eligen_node_is_described_as_before(comfy_server):
    with open(SNAPSHOT) as handle:
        before = without_file_lists(json.load(handle))
    now = without_file_lists({name: node for name, node in comfy_server.object_info().items()
                              if node.get("python_module", "").startswith("custom_nodes.comfyui_eligen")})
    assert sorted(now) == sorted(before)
    for name in before:
        for key in sorted(set(before[name]) | set(now[name])):
            assert now[name].get(key) == before[name].get(key), (name, key)
