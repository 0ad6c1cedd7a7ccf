"""Run files: a training job (training/job.py) as JSON, so the headless trainer (scripts/train.py, also
under torchrun) runs what an EliGen Train node ran, without a server.

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
(the same entry for model, clip and vae). Reading is strict (training/fields.py): every error names the
file and the field.
"""

import json
import logging
import os
from dataclasses import replace

from ..core.files import write_text
from .job import COMPONENTS, LOADERS, LoaderSpec, RunFileError, read_job

RUN_FILE_NAME = "run.json"


# ---------------------------------------------------------------------------------------------------
# Writing (the node side)


def _linked_loader(graph, node_id, input_name):
    """The LoaderSpec of the loader node that feeds ``input_name`` of node ``node_id`` in an API graph."""
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
    return LoaderSpec(loader, inputs)


def run_file_job(job, graph, node_id, graph_validation=False):
    """``job`` with the loaders of node ``node_id`` in the API ``graph`` filled in, checked as a run file
    would be read; RunFileError when it cannot be written down."""
    if not isinstance(graph, dict) or str(node_id) not in graph:
        raise RunFileError("the graph of this run is not available")
    if job.dataset.folder is None:
        raise RunFileError("dataset: it comes from graph images; only folder datasets can be exported")
    if graph_validation and job.train.validation_every:
        raise RunFileError("validation uses a prompt or entities from the graph, which a run file cannot hold")
    job = replace(job, **{component: _linked_loader(graph, node_id, component) for component in COMPONENTS})
    return read_job(json.loads(json.dumps(job.to_run_file())), "the exported run")


def export_run(run_dir, graph, node_id, job, graph_validation=False):
    """Write ``run_dir/run.json`` for the node's run (atomic), or log why not and remove a stale one.
    Returns the path written or None."""
    path = os.path.join(run_dir, RUN_FILE_NAME)
    try:
        job = run_file_job(job, graph, node_id, graph_validation)
    except RunFileError as error:
        logging.info("EliGen training: no run file written (%s)", error)
        if os.path.exists(path):
            os.remove(path)  # a file from an earlier run would describe something else
        return None
    return write_run(path, job)


def write_run(path, job):
    return write_text(path, json.dumps(job.to_run_file(), indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------------------------------------------
# Reading (the headless side)


def _no_duplicate_keys(pairs):
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise RunFileError(f"key {repeated[0]!r} appears twice in one object")
    return dict(pairs)


def load_run(path):
    """Read a run file strictly: a TrainingJob, or RunFileError naming the file and the bad field."""
    source = f"run file {path}"
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise RunFileError(f"{source}: cannot be read ({error.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RunFileError(f"{source}: not UTF-8 text (byte {error.start} is 0x{data[error.start]:02x}); "
                           f"save it as UTF-8") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as error:
        raise RunFileError(f"{source}: not valid JSON ({error.msg} at line {error.lineno})") from None
    except RunFileError as error:
        raise RunFileError(f"{source}: {error}") from None
    return read_job(value, source)
