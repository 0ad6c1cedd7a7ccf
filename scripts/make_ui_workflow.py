#!/usr/bin/env python3
"""Turn an API-format ComfyUI graph into a UI-format workflow (the kind the frontend opens and lists as a
template), using /object_info to know each node's input order, which inputs are widgets and output types.

    python scripts/make_ui_workflow.py api.json out.json --object-info object_info.json
    python scripts/make_ui_workflow.py api.json out.json --server http://127.0.0.1:8188 --note notes.md

The UI format (version 0.4): ``nodes`` with ids, type, pos (columns by dependency depth), size, socket
inputs with link ids, outputs with link lists, ``widgets_values`` in the node's widget order (plus the
extra values the frontend keeps: ``control_after_generate`` after seeds, ``upload`` after image pickers),
and ``links`` as ``[id, from node, from slot, to node, to slot, type]``. ``ui_to_api`` does the reverse,
as the frontend does when it queues a workflow.

API nodes may carry ``_meta.title`` (shown as the node title) and ``_meta.models`` (a list of
``{"name", "url", "directory"}``: the frontend offers to download missing model files from there).
Standard library only, so it runs outside ComfyUI's environment.
"""

import argparse
import json
import os
import sys
import tempfile
import urllib.request

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}  # the frontend adds control_after_generate to these even unasked
COLUMN_WIDTH = 460
NOTE_TYPE = "MarkdownNote"


def input_specs(node_info):
    """[(name, type, options)] of a node's visible inputs, required then optional, in the node's order."""
    inputs, order = node_info.get("input", {}), node_info.get("input_order", {})
    specs = []
    for group in ("required", "optional"):
        entries = inputs.get(group, {})
        for name in order.get(group, list(entries)):
            spec = entries[name]
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
            if isinstance(kind, list):  # a classic combo lists its options in place of a type
                kind, options = "COMBO", dict(options, options=kind)
            specs.append((name, kind, options))
    return specs


def is_widget(kind):
    return kind in WIDGET_TYPES


def extra_widget_values(name, kind, options):
    """Values the frontend stores after a widget's own value (not sent to the server)."""
    if kind == "INT" and (options.get("control_after_generate") or name in SEED_NAMES):
        return ["fixed"]  # keep example seeds reproducible
    if kind == "COMBO" and (options.get("image_upload") or options.get("video_upload") or options.get("audio_upload")):
        return ["image"]
    return []


def is_link(value, graph):
    return (isinstance(value, list) and len(value) == 2 and str(value[0]) in graph
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def _node_info(object_info, node_id, class_type):
    info = object_info.get(class_type)
    if info is None:
        raise ValueError(f"node {node_id}: type {class_type!r} is not in /object_info (is its package installed?)")
    return info


def _numeric_ids(graph):
    """API node id -> UI node id (an int): numeric ids are kept, others get fresh numbers."""
    ids, taken = {}, {int(k) for k in graph if str(k).isdigit()}
    next_id = max(taken, default=0) + 1
    for key in graph:
        if str(key).isdigit():
            ids[key] = int(key)
        else:
            ids[key], next_id = next_id, next_id + 1
    return ids


def _depths(graph):
    """Longest chain of links from a source node to each node (its column)."""
    depth = {}

    def visit(key, trail):
        if key in depth:
            return depth[key]
        if key in trail:
            raise ValueError(f"node {key}: the graph has a cycle through it")
        parents = [str(v[0]) for v in graph[key].get("inputs", {}).values() if is_link(v, graph)]
        depth[key] = 1 + max((visit(p, trail | {key}) for p in parents), default=-1)
        return depth[key]

    for key in graph:
        visit(key, frozenset())
    return depth


def _node_size(sockets, outputs, widgets, multiline, has_preview, shows_text=False):
    height = (30 + 22 * max(len(sockets), len(outputs), 0) + 26 * widgets + 80 * multiline + 380 * has_preview
              + 100 * shows_text)
    return [400 if multiline or has_preview or shows_text else 320, max(height, 60)]


def api_to_ui(graph, object_info, notes=()):
    """Build a UI-format workflow from an API-format graph (dict node id -> {class_type, inputs, _meta})."""
    graph = {str(k): v for k, v in graph.items()}
    ids, depths = _numeric_ids(graph), _depths(graph)
    order = sorted(graph, key=lambda k: (depths[k], ids[k]))
    nodes, links = {}, []
    for key in order:
        api_node = graph[key]
        class_type = api_node["class_type"]
        info = _node_info(object_info, key, class_type)
        values = api_node.get("inputs", {})
        known = {name for name, _, _ in input_specs(info)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"node {key} ({class_type}): inputs {unknown} are not inputs of {class_type}")
        sockets, linked_widgets, widgets_values, multiline, preview = [], [], [], 0, False
        for name, kind, options in input_specs(info):
            value = values.get(name)
            linked = is_link(value, graph)
            if not is_widget(kind):
                sockets.append((name, kind, value if linked else None, False))
                continue
            if linked:
                linked_widgets.append((name, kind, value, True))
                value = options.get("default")
            elif name not in values:
                if "default" not in options and not (kind == "COMBO" and options.get("options")):
                    raise ValueError(f"node {key} ({class_type}): widget input {name!r} has no value and no default")
                value = options.get("default", (options.get("options") or [None])[0])
            widgets_values += [value] + extra_widget_values(name, kind, options)
            multiline += kind == "STRING" and bool(options.get("multiline"))
            preview |= bool(options.get("image_upload"))
        # Output nodes that take images show them inside the node: leave room for the picture.
        preview |= bool(info.get("output_node")) and any(kind == "IMAGE" for _, kind, _, _ in sockets)
        outputs = info.get("output", [])
        output_names = info.get("output_name", outputs)
        # An output node with nothing to pass on and no picture shows text (Preview Any): room for it.
        shows_text = bool(info.get("output_node")) and not outputs and not preview
        node = {
            "id": ids[key], "type": class_type, "pos": [0, 0],
            "size": _node_size(sockets, outputs, len(widgets_values), multiline, preview, shows_text),
            "flags": {}, "order": len(nodes), "mode": 0,
            "inputs": [], "outputs": [{"name": output_names[i], "type": outputs[i], "links": [], "slot_index": i}
                                      for i in range(len(outputs))],
            "properties": {"Node name for S&R": class_type},
            "widgets_values": widgets_values,
        }
        meta = api_node.get("_meta", {})
        if meta.get("title"):
            node["title"] = meta["title"]
        if meta.get("models"):
            node["properties"]["models"] = meta["models"]
        # Socket inputs first, then widgets fed by a link (the frontend appends those as extra slots).
        for name, kind, value, widget in sockets + linked_widgets:
            slot = {"name": name, "type": kind, "link": None}
            if widget:
                slot["widget"] = {"name": name}
            if value is not None:
                source, source_slot = str(value[0]), value[1]
                source_node = nodes.get(source)
                if source_node is None or source_slot >= len(source_node["outputs"]):
                    raise ValueError(f"node {key} ({class_type}): input {name!r} links to output {source_slot} "
                                     f"of node {source}, which does not exist")
                link_id = len(links) + 1
                links.append([link_id, ids[source], source_slot, ids[key], len(node["inputs"]),
                              source_node["outputs"][source_slot]["type"]])
                source_node["outputs"][source_slot]["links"].append(link_id)
                slot["link"] = link_id
            node["inputs"].append(slot)
        nodes[key] = node
    _layout(nodes, depths, notes_present=bool(notes))
    ui_nodes = list(nodes.values())
    next_id = max(ids.values(), default=0) + 1
    y = 40
    for text in notes:  # frontend-only notes, in their own column on the left
        ui_nodes.append({"id": next_id, "type": NOTE_TYPE, "pos": [40, y], "size": [360, 320], "flags": {},
                         "order": len(ui_nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
                         "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
        next_id, y = next_id + 1, y + 360
    return {
        "last_node_id": max((n["id"] for n in ui_nodes), default=0),
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.75, "offset": [0, 0]}},
        "version": 0.4,
    }


def _layout(nodes, depths, notes_present):
    """Columns by dependency depth, nodes stacked top to bottom in each column."""
    left = 440 if notes_present else 40
    column_bottom = {}
    for key, node in nodes.items():
        column = depths[key]
        y = column_bottom.get(column, 40)
        node["pos"] = [left + column * COLUMN_WIDTH, y]
        column_bottom[column] = y + node["size"][1] + 50


def ui_to_api(workflow, object_info):
    """The API-format graph a UI-format workflow queues (what the frontend sends to /prompt)."""
    links = {link[0]: link for link in workflow["links"]}
    graph = {}
    for node in workflow["nodes"]:
        if node["type"] == NOTE_TYPE or node.get("mode", 0) != 0:
            continue
        info = _node_info(object_info, node["id"], node["type"])
        by_name = {slot["name"]: slot for slot in node.get("inputs", [])}
        values = iter(node.get("widgets_values", []))
        inputs = {}
        for name, kind, options in input_specs(info):
            if is_widget(kind):
                value = next(values)
                for _ in extra_widget_values(name, kind, options):
                    next(values)
                inputs[name] = value
            slot = by_name.get(name)
            if slot is not None and slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[name] = [str(link[1]), link[2]]
        api_node = {"inputs": inputs, "class_type": node["type"]}
        if node.get("title"):
            api_node["_meta"] = {"title": node["title"]}
        graph[str(node["id"])] = api_node
    return graph


def as_read_back(graph):
    """An API graph as ui_to_api gives it back from its UI twin: titles kept, model links (which the UI
    keeps in node properties) left out."""
    return {node_id: {"class_type": node["class_type"], "inputs": node["inputs"],
                      **({"_meta": {"title": node["_meta"]["title"]}} if node.get("_meta", {}).get("title") else {})}
            for node_id, node in graph.items()}


FILE_EXTENSIONS = {".safetensors", ".sft", ".gguf", ".ckpt", ".pt", ".pth", ".bin", ".png", ".jpg", ".jpeg", ".webp"}
VALUE_TYPES = {"INT": (int,), "FLOAT": (int, float), "STRING": (str,), "BOOLEAN": (bool,)}


def _types_fit(output_type, input_type):
    if "*" in (output_type, input_type):
        return True
    return bool(set(str(output_type).split(",")) & set(str(input_type).split(",")))


def check_api_graph(graph, object_info):
    """Problems of an API-format graph against /object_info, without running it: unknown node types,
    missing required or unknown inputs, links to missing nodes/outputs or of the wrong type, widget values
    of the wrong kind or not among a combo's options (file pickers are not checked: files vary)."""
    graph = {str(k): v for k, v in graph.items()}
    problems = []
    for key, node in graph.items():
        class_type = node.get("class_type")
        info = object_info.get(class_type)
        if info is None:
            problems.append(f"node {key}: type {class_type!r} is not installed")
            continue
        where = f"node {key} ({class_type})"
        values = node.get("inputs", {})
        specs = {name: (kind, options) for name, kind, options in input_specs(info)}
        required = set(info.get("input", {}).get("required", {}))
        problems += [f"{where}: required input {name!r} is missing" for name in sorted(required - set(values))]
        problems += [f"{where}: {name!r} is not an input of {class_type}" for name in sorted(set(values) - set(specs))]
        for name, value in values.items():
            if name not in specs:
                continue
            kind, options = specs[name]
            if is_link(value, graph):
                source = graph[str(value[0])]
                outputs = object_info.get(source.get("class_type"), {}).get("output", [])
                if value[1] >= len(outputs):
                    problems.append(f"{where}: input {name!r} links to output {value[1]} of node {value[0]}, "
                                    f"which has {len(outputs)} outputs")
                elif not _types_fit(outputs[value[1]], kind):
                    problems.append(f"{where}: input {name!r} ({kind}) is linked to a {outputs[value[1]]} output")
            elif isinstance(value, list):
                problems.append(f"{where}: input {name!r} links to node {value[0]}, which is not in the graph")
            elif not is_widget(kind):
                problems.append(f"{where}: input {name!r} takes a {kind} link, not the value {value!r}")
            elif kind == "COMBO":
                choices = options.get("options") or []
                is_file = isinstance(value, str) and os.path.splitext(value)[1].lower() in FILE_EXTENSIONS
                if choices and not is_file and value not in choices:
                    problems.append(f"{where}: {name!r} = {value!r} is not one of {choices}")
            elif kind in VALUE_TYPES and (not isinstance(value, VALUE_TYPES[kind])
                                          or (kind != "BOOLEAN" and isinstance(value, bool))):
                problems.append(f"{where}: {name!r} = {value!r} is not a {kind}")
    return problems


def load_object_info(path=None, server=None):
    if path:
        with open(path) as f:
            return json.load(f)
    with urllib.request.urlopen(server.rstrip("/") + "/object_info", timeout=60) as response:
        return json.load(response)


def write_json(path, data):
    """Atomic write: temp file in the same folder, then os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, temp_path = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.unlink(temp_path)
        raise


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("api_json", help="API-format graph (what 'Export (API)' saves)")
    parser.add_argument("out_json", help="where to write the UI-format workflow")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--object-info", help="a saved /object_info JSON")
    source.add_argument("--server", help="URL of a running ComfyUI to ask for /object_info")
    parser.add_argument("--note", action="append", default=[], help="a Markdown file shown as a note node")
    args = parser.parse_args(argv)
    with open(args.api_json) as f:
        graph = json.load(f)
    notes = []
    for path in args.note:
        with open(path) as f:
            notes.append(f.read())
    object_info = load_object_info(args.object_info, args.server)
    problems = check_api_graph(graph, object_info)
    if problems:
        sys.exit(f"{args.api_json}:\n  " + "\n  ".join(problems))
    try:
        workflow = api_to_ui(graph, object_info, notes)
    except ValueError as error:
        sys.exit(f"{args.api_json}: {error}")
    write_json(args.out_json, workflow)
    print(f"{args.out_json}: {len(workflow['nodes'])} nodes, {len(workflow['links'])} links")


if __name__ == "__main__":
    main()
