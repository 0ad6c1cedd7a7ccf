"""Run files: what an EliGen Train node would run, as JSON, so the headless trainer (scripts/train.py,
also under torchrun) runs the same thing without a server.

The node writes ``run.json`` next to its checkpoints (``output/eligen_training/<lora_name>/run.json``)
each time it starts a run whose inputs can be written down: the model, text encoder and VAE must come
straight from a supported loader node (``LOADERS``), the dataset from a folder, and validation must
not use a prompt or entities from the graph. Otherwise no run file is written and the log says why.

Schema (version 1; docs/design.md "Run files")::

    {"version": 1, "kind": "eligen_training_run",
     "model": {"loader": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
     "clip":  {"loader": "DualCLIPLoader", "inputs": {"clip_name1": "...", "clip_name2": "...", "type": "flux"}},
     "vae":   {"loader": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
     "dataset": {"folder": "/abs/path/of/dataset", "max_pixels": 1048576},
     "lora": {LoraSettings fields}, "train": {TrainSettings fields, the seed among them},
     "encoding": {"cache": "memory" | "disk" | "off", "entity_text_length": "padded_512" | "real_length"},
     "output": {"lora_name": "eligen_lora", "write_reference_format": false}}

The toy world's loader is ``{"loader": "EliGenToyModelLoader", "inputs": {"family", "weights", "seed"}}``
(the same entry for model, clip and vae).
"""

import json
import logging
import os
from dataclasses import asdict, fields

from ..core.files import write_text

VERSION = 1
KIND = "eligen_training_run"
RUN_FILE_NAME = "run.json"
COMPONENTS = ("model", "clip", "vae")
ENCODING_DEFAULTS = {"cache": "memory", "entity_text_length": "padded_512"}

# Loader node -> (its inputs: required, optional with default), the output index of each component it gives.
LOADERS = {
    "EliGenToyModelLoader": ({"family": None, "weights": None, "seed": None}, {"model": 0, "clip": 1, "vae": 2}),
    "CheckpointLoaderSimple": ({"ckpt_name": None}, {"model": 0, "clip": 1, "vae": 2}),
    "UNETLoader": ({"unet_name": None, "weight_dtype": "default"}, {"model": 0}),
    "CLIPLoader": ({"clip_name": None, "type": None, "device": "default"}, {"clip": 0}),
    "DualCLIPLoader": ({"clip_name1": None, "clip_name2": None, "type": None, "device": "default"}, {"clip": 0}),
    "VAELoader": ({"vae_name": None}, {"vae": 0}),
}


class RunFileError(ValueError):
    """A run file (or a graph being exported) that cannot be used; the message names the field."""


# ---------------------------------------------------------------------------------------------------
# Building (the node side)


def _linked_loader(graph, node_id, input_name):
    """{"loader", "inputs"} of the loader node that feeds ``input_name`` of node ``node_id`` in an API graph."""
    node = graph.get(str(node_id)) or {}
    link = (node.get("inputs") or {}).get(input_name)
    if not (isinstance(link, list) and len(link) == 2):
        raise RunFileError(f"{input_name}: not linked to a loader node")
    source = graph.get(str(link[0])) or {}
    loader = source.get("class_type")
    if loader not in LOADERS:
        raise RunFileError(f"{input_name}: comes from a {loader} node; a run file needs it straight from one of "
                           f"{', '.join(LOADERS)}")
    wanted, outputs = LOADERS[loader]
    if outputs.get(input_name) != link[1]:
        raise RunFileError(f"{input_name}: output {link[1]} of {loader} is not its {input_name}")
    inputs = {}
    for name, default in wanted.items():
        value = (source.get("inputs") or {}).get(name, default)
        if value is None or isinstance(value, list):
            raise RunFileError(f"{input_name}: {loader} input {name!r} is not a plain value in the graph")
        inputs[name] = value
    return {"loader": loader, "inputs": inputs}


def build_run(graph, node_id, dataset, lora_settings, settings, lora_name, cache="memory",
              entity_text_length="padded_512", write_reference_format=False, graph_validation=False):
    """The run file of one EliGen Train node in an API ``graph``; RunFileError when it cannot be written down."""
    if not isinstance(graph, dict) or str(node_id) not in graph:
        raise RunFileError("the graph of this run is not available")
    if getattr(dataset, "root", None) is None:
        raise RunFileError("dataset: it comes from graph images; only folder datasets can be exported")
    if graph_validation and settings.validation_every:
        raise RunFileError("validation uses a prompt or entities from the graph, which a run file cannot hold")
    run = {"version": VERSION, "kind": KIND}
    for component in COMPONENTS:
        run[component] = _linked_loader(graph, node_id, component)
    run["dataset"] = {"folder": dataset.root, "max_pixels": int(dataset.max_pixels)}
    run["lora"] = lora_settings.to_dict()
    run["train"] = asdict(settings)
    run["encoding"] = {"cache": cache, "entity_text_length": entity_text_length}
    run["output"] = {"lora_name": lora_name, "write_reference_format": bool(write_reference_format)}
    return validate_run(run, "the exported run")


def export_run(run_dir, graph, node_id, **parts):
    """Write ``run_dir/run.json`` for the node's run (atomic), or log why not and remove a stale one.
    Returns the path written or None."""
    path = os.path.join(run_dir, RUN_FILE_NAME)
    try:
        run = build_run(graph, node_id, **parts)
    except RunFileError as error:
        logging.info("EliGen training: no run file written (%s)", error)
        if os.path.exists(path):
            os.remove(path)  # a file from an earlier run would describe something else
        return None
    return write_run(path, run)


def write_run(path, run):
    return write_text(path, json.dumps(run, indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------------------------------------------
# Checking and loading (the headless side)


def _object(run, key, source):
    value = run.get(key)
    if not isinstance(value, dict):
        raise RunFileError(f"{source}: field '{key}' must be an object, got {json.dumps(value)[:60]}")
    return value


def _dataclass_from(cls, values, field_name, source):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RunFileError(f"{source}: field '{field_name}' has unknown keys {', '.join(unknown)}")
    try:
        return cls(**values).validate()
    except (TypeError, ValueError) as error:
        raise RunFileError(f"{source}: field '{field_name}': {error}") from None


def _check_component(run, component, source):
    spec = _object(run, component, source)
    loader = spec.get("loader")
    if loader not in LOADERS:
        raise RunFileError(f"{source}: field '{component}.loader' is {loader!r}, not one of {', '.join(LOADERS)}")
    wanted, outputs = LOADERS[loader]
    if component not in outputs:
        raise RunFileError(f"{source}: field '{component}.loader': {loader} does not give a {component}")
    inputs = spec.get("inputs")
    if not isinstance(inputs, dict):
        raise RunFileError(f"{source}: field '{component}.inputs' must be an object")
    unknown = sorted(set(inputs) - set(wanted))
    if unknown:
        raise RunFileError(f"{source}: field '{component}.inputs' has unknown keys {', '.join(unknown)}")
    for name, default in wanted.items():
        value = inputs.get(name, default)
        if value is None or not isinstance(value, (str, int, float, bool)):
            raise RunFileError(f"{source}: field '{component}.inputs.{name}' must be a plain value, "
                               f"got {json.dumps(value)[:60]}")
    return {"loader": loader, "inputs": {name: inputs.get(name, default) for name, default in wanted.items()}}


def validate_run(run, source="run file"):
    """A checked, complete copy of a run (dict); RunFileError naming the first bad field."""
    from ..core.conditioning import TEXT_LENGTHS
    from .lora import LoraSettings
    from .loop import TrainSettings

    if not isinstance(run, dict):
        raise RunFileError(f"{source}: expected a JSON object, got {type(run).__name__}")
    if run.get("version") != VERSION:
        raise RunFileError(f"{source}: field 'version' is {run.get('version')!r}; this package reads version {VERSION}")
    if run.get("kind", KIND) != KIND:
        raise RunFileError(f"{source}: field 'kind' is {run.get('kind')!r}, not {KIND!r}")
    checked = {"version": VERSION, "kind": KIND}
    for component in COMPONENTS:
        checked[component] = _check_component(run, component, source)

    dataset = _object(run, "dataset", source)
    folder = dataset.get("folder")
    if not isinstance(folder, str) or not folder.strip():
        raise RunFileError(f"{source}: field 'dataset.folder' must be a non-empty path")
    max_pixels = dataset.get("max_pixels", 1024 * 1024)
    if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 256:
        raise RunFileError(f"{source}: field 'dataset.max_pixels' must be an integer >= 256, got {max_pixels!r}")
    checked["dataset"] = {"folder": folder, "max_pixels": max_pixels}

    checked["lora"] = _dataclass_from(LoraSettings, _object(run, "lora", source), "lora", source).to_dict()
    checked["train"] = asdict(_dataclass_from(TrainSettings, _object(run, "train", source), "train", source))

    encoding = {**ENCODING_DEFAULTS, **run.get("encoding", {})} if isinstance(run.get("encoding", {}), dict) else None
    if encoding is None:
        raise RunFileError(f"{source}: field 'encoding' must be an object")
    if encoding["cache"] not in ("memory", "disk", "off"):
        raise RunFileError(f"{source}: field 'encoding.cache' is {encoding['cache']!r}, not memory, disk or off")
    if encoding["entity_text_length"] not in TEXT_LENGTHS:
        raise RunFileError(f"{source}: field 'encoding.entity_text_length' is {encoding['entity_text_length']!r}, "
                           f"not one of {', '.join(TEXT_LENGTHS)}")
    checked["encoding"] = {k: encoding[k] for k in ENCODING_DEFAULTS}

    output = _object(run, "output", source)
    name = output.get("lora_name")
    if not isinstance(name, str) or not name or name != os.path.basename(name) or name.startswith(".") \
            or any(c in name for c in '/\\:*?"<>|'):
        raise RunFileError(f"{source}: field 'output.lora_name' must be a plain file name, got {name!r}")
    if not isinstance(output.get("write_reference_format", False), bool):
        raise RunFileError(f"{source}: field 'output.write_reference_format' must be true or false")
    checked["output"] = {"lora_name": name, "write_reference_format": output.get("write_reference_format", False)}
    return checked


def load_run(path):
    """Read and check a run file; RunFileError naming the file and the bad field."""
    try:
        with open(path, encoding="utf-8") as handle:
            run = json.load(handle)
    except OSError as error:
        raise RunFileError(f"run file {path}: cannot be read ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise RunFileError(f"run file {path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    return validate_run(run, f"run file {path}")


def settings_of(run):
    """(LoraSettings, TrainSettings) of a checked run."""
    from .lora import LoraSettings
    from .loop import TrainSettings

    return LoraSettings(**run["lora"]).validate(), TrainSettings(**run["train"]).validate()
