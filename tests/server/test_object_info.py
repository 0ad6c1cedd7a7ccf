"""What the frontend and API users see of every EliGen node (/object_info: inputs, defaults, limits,
tooltips, outputs) changes only on purpose: it must equal the snapshot in tests/data/object_info_eligen.json.
Saved workflows and API graphs depend on it, so a change there is a reviewed change: after a deliberate
one, rewrite the snapshot with `ELIGEN_UPDATE_OBJECT_INFO=1 bash scripts/run_tests.sh -k object_info` and
commit it with the change (the diff shows what users will see)."""

import json
import os

import pytest

SNAPSHOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "object_info_eligen.json")
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
    ours = {name: node for name, node in comfy_server.object_info().items()
            if node.get("python_module", "").startswith("custom_nodes.comfyui_eligen")}
    if os.environ.get("ELIGEN_UPDATE_OBJECT_INFO") == "1":
        with open(SNAPSHOT, "w") as handle:
            json.dump(without_file_lists(ours), handle, indent=1, sort_keys=True)
            handle.write("\n")
        pytest.skip("snapshot rewritten: review its diff and commit it")
    now = without_file_lists(ours)
    assert sorted(now) == sorted(before)
    for name in before:
        for key in sorted(set(before[name]) | set(now[name])):
            assert now[name].get(key) == before[name].get(key), (name, key)
