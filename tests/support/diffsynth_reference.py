"""The reference's own code (diffsynth==2.1.12, installed by scripts/setup.sh with ``--no-deps``).

Two ways in, both failing (never skipping) with the command that installs the reference when it is missing
or another version, so a comparison can never silently do nothing:

- ``flux_dit_reference()``: only ``diffsynth/models/flux_dit.py`` and the one module it imports, loaded
  under a private package name, for the mask rule (``construct_mask``; no weights, cheap).
- ``reference()``: the package itself (DiTs, state-dict converters, model loader, the pipelines' model
  functions and EliGen units, the training loss, scheduler, LoRA injection and loading). Importing the
  package runs its ``__init__``, which imports three modules that only its data loading and model download
  use (imageio, pandas, modelscope) and that ``--no-deps`` leaves out; while it imports, each missing one
  is a placeholder whose every attribute raises when used, and the placeholders are removed afterwards.
"""

import contextlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types

import pytest

DIFFSYNTH = "diffsynth==2.1.12"
PRIVATE = "_eligen_diffsynth_reference"
# Imported by diffsynth's __init__ for dataset files and model downloads only; never called by the comparison.
IO_ONLY_MODULES = ("imageio", "imageio.v3", "pandas", "modelscope")
# What the comparisons use, by short name.
REFERENCE_MODULES = {
    "flux_dit": "diffsynth.models.flux_dit",
    "flux_converter": "diffsynth.utils.state_dict_converters.flux_dit",
    "flux_pipeline": "diffsynth.pipelines.flux_image",
    "qwen_image_dit": "diffsynth.models.qwen_image_dit",
    "qwen_image_pipeline": "diffsynth.pipelines.qwen_image",
    "loader": "diffsynth.core.loader.model",
    "loss": "diffsynth.diffusion.loss",
    "training_module": "diffsynth.diffusion.training_module",
}


def _package_folder():
    spec = importlib.util.find_spec("diffsynth")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = next(iter(spec.submodule_search_locations))
    return folder if os.path.isfile(os.path.join(folder, "models", "flux_dit.py")) else None


def _require_reference():
    """The installed reference's folder; the test fails when it is missing or another version."""
    folder = _package_folder()
    if folder is None:
        pytest.fail(f"the reference package is missing: install it with `pip install --no-deps {DIFFSYNTH}` "
                    f"(scripts/setup.sh does this); the comparison with DiffSynth-Studio must run")
    from importlib.metadata import version

    if version("diffsynth") != DIFFSYNTH.split("==")[1]:
        pytest.fail(f"diffsynth {version('diffsynth')} is installed; the comparison is pinned to {DIFFSYNTH}")
    return folder


def flux_dit_reference():
    """An object with the reference's ``construct_mask`` and ``patchify`` (FluxDiT without weights)."""
    folder = os.path.join(_require_reference(), "models")
    if PRIVATE not in sys.modules:
        package = types.ModuleType(PRIVATE)
        package.__path__ = [folder]
        sys.modules[PRIVATE] = package
    module = importlib.import_module(f"{PRIVATE}.flux_dit")
    return module.FluxDiT.__new__(module.FluxDiT)  # construct_mask/patchify use no weights


def _placeholder_module(name):
    module = types.ModuleType(name)
    module.__path__ = []
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)

    def __getattr__(attribute):
        if attribute.startswith("__"):
            raise AttributeError(attribute)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"{name}.{attribute} is not installed here; the reference comparison must not need it")

        unavailable.__name__ = attribute
        return unavailable

    module.__getattr__ = __getattr__
    return module


@contextlib.contextmanager
def _io_placeholders():
    added = []
    for name in IO_ONLY_MODULES:
        top = name.split(".")[0]
        if name in sys.modules or (top not in added and importlib.util.find_spec(top) is not None):
            continue
        sys.modules[name] = _placeholder_module(name)
        added.append(name)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


_modules = None


def reference():
    """The reference's modules (``REFERENCE_MODULES``) as attributes of one namespace, imported once."""
    global _modules
    _require_reference()
    if _modules is None:
        with _io_placeholders():
            _modules = types.SimpleNamespace(**{short: importlib.import_module(name)
                                                for short, name in REFERENCE_MODULES.items()})
    return _modules
