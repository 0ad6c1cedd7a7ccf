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
from . import lora
from .settings import lr_lambda

POINTER = "latest.json"
METADATA_KEY = "eligen_checkpoint"
FILE_PATTERN = re.compile(r"step_(\d+)\.safetensors")
# LoRA settings a resumed run must share with its checkpoint (alpha rescales the update, the others
# change which tensors exist); dropout, the initialisation and the LoRA dtype may change.
RESUME_MUST_MATCH = ("rank", "alpha", "preset", "custom_pattern")


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


def checkpoint_step(path):
    """The step of a checkpoint file, from its name."""
    return int(FILE_PATTERN.fullmatch(os.path.basename(path)).group(1))


def checkpoint_steps(run_dir):
    """The steps of the checkpoints in ``run_dir``, in order."""
    return sorted(_checkpoint_files(run_dir))


def _checkpoint_files(run_dir):
    """{step: file name} of the checkpoints in ``run_dir`` (one run: see training/outputs.py)."""
    return {int(m.group(1)): f for f in os.listdir(run_dir) if (m := FILE_PATTERN.fullmatch(f))}


def _prune(run_dir, keep_last, keep):
    if not keep_last:
        return
    files = _checkpoint_files(run_dir)
    for step in sorted(files)[:-keep_last]:  # by step number, not by name
        if files[step] != keep:
            os.remove(os.path.join(run_dir, files[step]))


def keep_last_finite(run_dir, bad_step):
    """After a non-finite loss or gradient computed with the weights of step ``bad_step``: set aside the
    checkpoint of that step (renamed ``step_<n>.nonfinite``, never loaded or listed) and point
    ``latest.json`` at the newest earlier checkpoint, whose weights were followed by finite losses.
    Returns that checkpoint's path, or None when there is none."""
    if run_dir is None or not os.path.isdir(run_dir):
        return None
    files = _checkpoint_files(run_dir)
    for step in [s for s in files if s >= bad_step]:
        bad = os.path.join(run_dir, files.pop(step))
        os.replace(bad, bad[: -len(".safetensors")] + ".nonfinite")
    pointer = os.path.join(run_dir, POINTER)
    if not files:
        if os.path.exists(pointer):
            os.remove(pointer)
        return None
    step = max(files)
    write_text(pointer, json.dumps({"checkpoint": files[step], "step": step}))
    return os.path.join(run_dir, files[step])


def latest_checkpoint(run_dir):
    """Path of the last complete checkpoint of a run, or None when the run has none."""
    pointer = os.path.join(run_dir, POINTER)
    if not os.path.exists(pointer):
        return None
    with open(pointer, encoding="utf-8") as handle:
        try:
            name = json.load(handle)["checkpoint"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
            raise ValueError(f"checkpoint pointer {pointer} is damaged ({type(error).__name__}: {error}); "
                             f"name a checkpoint file in resume instead of 'latest'") from None
    if not isinstance(name, str):
        raise ValueError(f"checkpoint pointer {pointer} is damaged: 'checkpoint' is not a file name")
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
        try:
            meta = json.loads(meta_text)
        except ValueError as error:
            raise ValueError(f"checkpoint {path}: its '{METADATA_KEY}' metadata is not valid JSON ({error})") from None
        missing = [key for key in ("step", "info", "optimizer", "scheduler") if not isinstance(meta, dict) or key not in meta]
        if missing:
            raise ValueError(f"checkpoint {path}: its '{METADATA_KEY}' metadata lacks {', '.join(map(repr, missing))}")
        if not isinstance(meta["step"], int) or meta["step"] < 0 or not isinstance(meta["info"], dict):
            raise ValueError(f"checkpoint {path}: its '{METADATA_KEY}' metadata has a bad 'step' or 'info'")
        optimizer_meta = meta["optimizer"]
        if not isinstance(optimizer_meta, dict) or not {"param_groups", "scalars"} <= set(optimizer_meta):
            raise ValueError(f"checkpoint {path}: its optimizer metadata lacks 'param_groups' or 'scalars'")
        self.step = meta["step"]
        self.info = meta["info"]
        self._optimizer_meta = optimizer_meta
        self._scheduler_state = meta["scheduler"]
        self.lora = {k[len("lora."):]: v for k, v in tensors.items() if k.startswith("lora.")}
        self._optimizer_tensors = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"checkpoint {path}: tensor {name!r} holds NaN or inf values")

    def check_lora_settings(self, lora_settings):
        """Resume only with the LoRA shape and scale the checkpoint was trained with; the message names
        every difference."""
        saved = self.info.get("lora")
        if not isinstance(saved, dict):
            raise ValueError(f"checkpoint {self.path} does not record its LoRA settings")
        current = lora_settings.to_dict()
        different = [f"{key} {saved.get(key)!r} in the checkpoint, {current[key]!r} now"
                     for key in RESUME_MUST_MATCH if saved.get(key) != current.get(key)]
        if different:
            raise ValueError(f"resume: checkpoint {self.path} was trained with other LoRA settings ("
                             + "; ".join(different) + "); use the same LoRA config, or start a new run")

    def restore(self, model, lora_settings, settings, optimizer, scheduler, scaler):
        """Load this checkpoint into a training run: LoRA weights, optimizer, schedule (at this run's
        learning rate) and loss scale. Returns (step, losses so far)."""
        family = model.adapter.family
        if self.info.get("family") != family:
            raise ValueError(f"resume: checkpoint {self.path} is for {self.info.get('family')}, this model is {family}")
        self.check_lora_settings(lora_settings)
        lora.load_lora_tensors(model.diffusion_model, self.lora)
        self.restore_optimizer(optimizer)
        self.restore_scheduler(scheduler)
        use_learning_rate(optimizer, scheduler, settings)  # this run's rate, not the checkpoint's
        if self.info.get("grad_scaler"):
            scaler.load_state_dict(self.info["grad_scaler"])
        return self.step, [tuple(x) for x in self.info.get("losses", [])]

    def restore_optimizer(self, optimizer):
        try:
            state = _unflatten_optimizer(self._optimizer_tensors, self._optimizer_meta)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"checkpoint {self.path}: its optimizer state is damaged "
                             f"({type(error).__name__}: {error})") from None
        if len(state["param_groups"]) != len(optimizer.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(state["param_groups"], optimizer.param_groups)
        ):
            raise ValueError(f"checkpoint {self.path}: optimizer state does not match the LoRA parameters")
        optimizer.load_state_dict(state)

    def restore_scheduler(self, scheduler):
        if self._scheduler_state is not None:
            # LambdaLR stores its lambdas as None: the functions are rebuilt from the settings.
            scheduler.load_state_dict(dict(self._scheduler_state))


def use_learning_rate(optimizer, scheduler, settings):
    """Set the learning rate of ``settings`` (with the schedule at its current step) on a restored
    optimizer and scheduler, which otherwise keep the rate of the run that wrote the checkpoint."""
    scheduler.base_lrs = [settings.learning_rate] * len(optimizer.param_groups)
    factor = lr_lambda(settings)(scheduler.last_epoch)
    for group in optimizer.param_groups:
        group["initial_lr"] = settings.learning_rate
        group["lr"] = settings.learning_rate * factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


class LastFiniteWeights:
    """A CPU copy of the LoRA weights of the last step whose loss and gradients were finite, taken just
    before that step's update: when the very next step is non-finite and no checkpoint holds these
    weights, ``save`` writes them (with a fresh optimizer state), so a run that blows up at once still
    leaves a checkpoint to resume from. Only kept when the run has a folder."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.step = None
        self.lora = None

    def remember(self, step, named_parameters):
        if self.run_dir is not None:
            self.step = step
            self.lora = {name: p.detach().to("cpu", copy=True) for name, p in named_parameters.items()}

    def save(self, bad_step, kept, fresh_optimizer, scheduler_state, info):
        """The checkpoint of step ``bad_step - 1`` from the copy, unless ``kept`` (the path
        ``keep_last_finite`` returned) already is that step or no copy of that step exists."""
        step = bad_step - 1
        if self.lora is None or self.step != step or (kept and kept.endswith(f"step_{step:06d}.safetensors")):
            return kept
        state = dict(scheduler_state, last_epoch=step)
        scheduler = type("SchedulerState", (), {"state_dict": lambda _: state})()
        return save_checkpoint(self.run_dir, step, self.lora, fresh_optimizer, scheduler, info, keep_last=0)
