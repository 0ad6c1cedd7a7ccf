"""Training checkpoints: one folder per run, safetensors only (no pickle), atomic writes.

A checkpoint file ``step_000040.safetensors`` holds
  ``lora.<module>.lora_A`` / ``lora.<module>.lora_B``   the LoRA tensors
  ``optimizer.<param index>.<key>``                     tensor entries of the optimizer state
and its safetensors metadata ``eligen_checkpoint`` is JSON with the step, the optimizer param groups and
non-tensor state, the LR scheduler state, the loss history and the settings of the run.
``latest.json`` names the last checkpoint that was written completely; it is replaced (atomically) only
after the checkpoint file itself is in place, so it always points at a good file.
"""

import json
import os
import re

import torch
from safetensors import safe_open

from ..core.files import write_text
from ..core.lora_formats import save_lora

POINTER = "latest.json"
METADATA_KEY = "eligen_checkpoint"
FILE_PATTERN = re.compile(r"step_(\d+)\.safetensors")


def _flatten_optimizer(optimizer):
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors, meta):
    state = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, entries in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def _jsonable(value):
    # LambdaLR keeps its lambdas as None in state_dict; everything else is numbers, lists, bools.
    return json.loads(json.dumps(value, default=lambda _: None))


def save_checkpoint(run_dir, step, lora_tensors, optimizer, scheduler, info, keep_last=3):
    """Write ``step_<step>.safetensors`` into ``run_dir`` and point ``latest.json`` at it.
    ``lora_tensors``: {name: tensor}; ``info``: JSON-able (settings, loss history...). Returns the path."""
    tensors = {f"lora.{name}": t.detach().to("cpu").contiguous().clone() for name, t in lora_tensors.items()}
    optimizer_tensors, optimizer_meta = _flatten_optimizer(optimizer)
    tensors.update(optimizer_tensors)
    meta = {
        "step": int(step),
        "optimizer": optimizer_meta,
        "scheduler": _jsonable(scheduler.state_dict()) if scheduler is not None else None,
        "info": info,
    }
    name = f"step_{int(step):06d}.safetensors"
    path = os.path.join(run_dir, name)
    save_lora(path, tensors, {METADATA_KEY: json.dumps(meta)})  # atomic safetensors write
    pointer = {"checkpoint": name, "step": int(step)}
    write_text(os.path.join(run_dir, POINTER), json.dumps(pointer))
    _prune(run_dir, keep_last, keep=name)
    return path


def _prune(run_dir, keep_last, keep):
    if not keep_last:
        return
    files = sorted(f for f in os.listdir(run_dir) if FILE_PATTERN.fullmatch(f))
    for old in files[:-keep_last]:
        if old != keep:
            os.remove(os.path.join(run_dir, old))


def latest_checkpoint(run_dir):
    """Path of the last complete checkpoint of a run, or None when the run has none."""
    pointer = os.path.join(run_dir, POINTER)
    if not os.path.exists(pointer):
        return None
    with open(pointer, encoding="utf-8") as handle:
        try:
            name = json.load(handle)["checkpoint"]
        except (ValueError, KeyError) as error:
            raise ValueError(f"checkpoint pointer {pointer} is damaged: {error}") from None
    return resolve_checkpoint(run_dir, name)


def resolve_checkpoint(run_dir, name):
    """A checkpoint file name inside ``run_dir``; refuses names that leave the folder."""
    if not FILE_PATTERN.fullmatch(name):
        raise ValueError(f"checkpoint name {name!r} is not of the form step_000123.safetensors")
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        raise ValueError(f"checkpoint {name} does not exist in {run_dir}")
    return path


class Checkpoint:
    """A loaded checkpoint: ``step``, ``lora`` {name: tensor}, ``info``, and restore helpers."""

    def __init__(self, path):
        self.path = path
        try:
            with safe_open(path, framework="pt") as handle:
                meta_text = (handle.metadata() or {}).get(METADATA_KEY)
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise ValueError(f"checkpoint {path} cannot be read: {error}") from None
        if meta_text is None:
            raise ValueError(f"checkpoint {path} has no '{METADATA_KEY}' metadata (not an EliGen checkpoint)")
        meta = json.loads(meta_text)
        self.step = meta["step"]
        self.info = meta["info"]
        self._optimizer_meta = meta["optimizer"]
        self._scheduler_state = meta["scheduler"]
        self.lora = {k[len("lora."):]: v for k, v in tensors.items() if k.startswith("lora.")}
        self._optimizer_tensors = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}

    def restore_optimizer(self, optimizer):
        state = _unflatten_optimizer(self._optimizer_tensors, self._optimizer_meta)
        if len(state["param_groups"]) != len(optimizer.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(state["param_groups"], optimizer.param_groups)
        ):
            raise ValueError(f"checkpoint {self.path}: optimizer state does not match the LoRA parameters")
        optimizer.load_state_dict(state)

    def restore_scheduler(self, scheduler):
        if self._scheduler_state is not None:
            # LambdaLR stores its lambdas as None: the functions are rebuilt from the settings.
            scheduler.load_state_dict(dict(self._scheduler_state))
