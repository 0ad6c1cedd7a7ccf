"""The one contact package with ComfyUI internals, one module per ComfyUI area.

ComfyUI changes its internals without notice. Everything this package needs from ``comfy.*``,
``folder_paths``, ``server`` and ComfyUI's own ``nodes`` (other than the public node API in
``comfy_api.latest``) goes through a function of an area module, and each function checks the
capability it relies on (an attribute, a signature, a tensor layout) before using it. A missing
capability raises ``MissingCapability`` naming it and the ComfyUI version, never a raw AttributeError
or IndexError. Callers write ``host.<area>.<function>``:

    attention  the attention functions, the attention override, the FLUX attention call
    models     model classes, forward arguments, wrappers and block replacements, block internals,
               model sampling, conditioning classes, the tiny models' configs, sampling the stock way
    weights    the LoRA key map and key forms, weight patches, applying a LoRA
    memory     model management, loading for training, block-swap patching, inference-tensor aliasing,
               devices, ModelPatchers around modules
    encoders   text encoders and VAEs (comfy.sd.CLIP / VAE): identities for cache keys, the prompt-weight
               syntax, building the toy world's CLIP and VAE from the stock classes
    files      folder_paths, the server (progress bar, cancel, progress text), headless model loading

The surface every node uses is read directly: ``ModelPatcher.model`` / ``load_device`` / ``clone()`` /
``get_model_object()``, ``BaseModel.diffusion_model`` / ``process_latent_in()``, ``LatentFormat.process_in``
/ ``process_out``, ``CLIP.tokenize`` / ``encode_from_tokens``, ``VAE.encode`` / ``decode``. Everything
beneath it is a contact point here.

This module is the registry: each area registers the check of every contact point where the contact
is defined (``@contact_point``), in one of three kinds:
  start-up checks (``CONTACTS``): run by ``startup_report`` and ``require_all``;
  headless checks (``HEADLESS_CONTACTS``): what only scripts/train.py needs; the tests run them;
  runtime contacts (``RUNTIME_CONTACTS``): functions that check the objects they are given while the
  model runs (a tensor layout, a block's parts); the contract tests exercise each one.
"""

import functools
import importlib
import inspect
import logging
import re

import torch


class MissingCapability(RuntimeError):
    """ComfyUI lacks something this package relies on; the message names the contact point."""


TESTED_VERSIONS = ("0.3.64", "0.3.75")  # each one runs the server tests in CI or locally (README, "ComfyUI versions")
UNKNOWN_VERSION = "unknown"


@functools.lru_cache(maxsize=None)
def comfyui_version():
    """ComfyUI's version string from its ``comfyui_version.py`` (``unknown`` when the file is absent)."""
    try:
        return str(importlib.import_module("comfyui_version").__version__)
    except (ImportError, AttributeError):
        return UNKNOWN_VERSION


def version_tuple(text):
    """``"0.3.64"`` -> ``(0, 3, 64)``; None when the text is not a dotted version."""
    parts = re.findall(r"\d+", text or "")
    return tuple(int(p) for p in parts[:3]) if parts else None


def tested_range_text():
    return f"{TESTED_VERSIONS[0]} to {TESTED_VERSIONS[-1]}"


def missing(contact, detail):
    """The MissingCapability for ``contact`` (the contact point's name) with what was found instead."""
    error = MissingCapability(
        f"EliGen cannot use ComfyUI {comfyui_version()}: {contact}: {detail} (EliGen is tested with ComfyUI "
        f"{tested_range_text()})")
    error.contact, error.detail = contact, detail
    return error


# -- the checks the area modules are built from -----------------------------------------------------

def comfy_module(name, contact):
    """ComfyUI's module ``name`` (``comfy.sd``, ``folder_paths``, ...)."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise missing(contact, f"module {name} cannot be imported ({error})") from None


def attribute(owner, name, contact):
    """``owner.name``; None or absent is a missing capability."""
    value = getattr(owner, name, None)
    if value is None:
        where = getattr(owner, "__name__", type(owner).__name__)
        raise missing(contact, f"{where}.{name} does not exist")
    return value


def module_attribute(owner, name, contact):
    """``owner.name`` when it is a torch module (ComfyUI's objects hold their weights in one)."""
    module = getattr(owner, name, None)
    if not isinstance(module, torch.nn.Module):
        raise missing(contact, f"{type(owner).__name__} has no {name} module")
    return module


def keyword_parameters(function, names, contact):
    """Check that ``function`` takes the keyword arguments ``names``; returns its parameter names."""
    try:
        params = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        raise missing(contact, f"{getattr(function, '__qualname__', function)} has no readable signature") from None
    absent = [n for n in names if n not in params]
    if absent:
        raise missing(contact, f"{getattr(function, '__qualname__', function)} takes no {', '.join(absent)} "
                               f"(it takes {', '.join(params)})")
    return params


# -- the registry -------------------------------------------------------------------------------------

STARTUP, HEADLESS, RUNTIME = "start-up", "headless", "runtime"
CONTACTS = {}           # contact point -> check(): raises MissingCapability
HEADLESS_CONTACTS = {}  # contact point -> check(), for what only the headless trainer loads
RUNTIME_CONTACTS = {}   # contact point -> the function that checks it on the objects it is given
_REGISTRIES = {STARTUP: CONTACTS, HEADLESS: HEADLESS_CONTACTS, RUNTIME: RUNTIME_CONTACTS}


def contact_point(name, kind=STARTUP):
    """Register the decorated function as contact point ``name`` of ``kind`` (STARTUP and HEADLESS:
    a check without arguments; RUNTIME: the function that checks what it reads)."""
    registry = _REGISTRIES[kind]

    def register(function):
        if name in registry:
            raise ValueError(f"{kind} contact point {name!r} is registered twice")
        registry[name] = function
        return function
    return register


def missing_capabilities():
    """``[MissingCapability]`` for every start-up contact point whose check fails (empty: all present)."""
    problems = []
    for check in CONTACTS.values():
        try:
            check()
        except MissingCapability as error:
            problems.append(error)
    return problems


def startup_report(log=logging.getLogger("comfyui_eligen")):
    """Log one line about this ComfyUI: a refusal naming what is missing, a notice for a version newer
    than the newest tested one, nothing when it is a tested version. Returns the problems found."""
    problems = missing_capabilities()
    version = comfyui_version()
    if problems:
        names = "; ".join(getattr(p, "contact", str(p)) for p in problems)
        log.error("EliGen: ComfyUI %s is not supported (tested: %s); missing: %s. EliGen nodes will fail "
                  "with this message.", version, tested_range_text(), names)
        return problems
    newest = version_tuple(TESTED_VERSIONS[-1])
    oldest = version_tuple(TESTED_VERSIONS[0])
    current = version_tuple(version)
    if current is None or current > newest:
        log.warning("EliGen: ComfyUI %s is newer than the newest tested version %s; every capability EliGen "
                    "uses checks out, so it runs.", version, TESTED_VERSIONS[-1])
    elif current < oldest:
        log.warning("EliGen: ComfyUI %s is older than the oldest tested version %s; every capability EliGen "
                    "uses checks out, so it runs.", version, TESTED_VERSIONS[0])
    return problems


def require_all():
    """Raise the first start-up problem (for nodes: each affected node fails with the start-up message)."""
    problems = missing_capabilities()
    if len(problems) == 1:
        raise problems[0]
    if problems:
        first = problems[0]
        others = ", ".join(p.contact for p in problems[1:])
        raise MissingCapability(f"{first} (also missing: {others})")


# The areas register their contact points above as they are imported; the order is the order of the
# start-up checks.
from . import models, attention, weights, memory, encoders, files  # noqa: E402,F401
