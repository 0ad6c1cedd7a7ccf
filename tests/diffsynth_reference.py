"""The reference's own code (diffsynth==2.1.12, installed by scripts/setup.sh with ``--no-deps``).

Only ``diffsynth/models/flux_dit.py`` and the one module it imports are loaded, under a private package
name, so the package's ``__init__`` (which needs imageio, transformers, ...) never runs. A missing or
different diffsynth fails the test that asks for it, with the command that installs it: the
comparison must never silently do nothing.
"""

import importlib.util
import os
import sys
import types

import pytest

DIFFSYNTH = "diffsynth==2.1.12"
PRIVATE = "_eligen_diffsynth_reference"


def _models_folder():
    spec = importlib.util.find_spec("diffsynth")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(list(spec.submodule_search_locations)[0], "models")
    return folder if os.path.isfile(os.path.join(folder, "flux_dit.py")) else None


def flux_dit_reference():
    """An object with the reference's ``construct_mask`` and ``patchify`` (FluxDiT without weights)."""
    folder = _models_folder()
    if folder is None:
        pytest.fail(f"the reference package is missing: install it with `pip install --no-deps {DIFFSYNTH}` "
                    f"(scripts/setup.sh does this); the comparison with its construct_mask must run")
    from importlib.metadata import version

    if version("diffsynth") != DIFFSYNTH.split("==")[1]:
        pytest.fail(f"diffsynth {version('diffsynth')} is installed; the comparison is pinned to {DIFFSYNTH}")
    if PRIVATE not in sys.modules:
        package = types.ModuleType(PRIVATE)
        package.__path__ = [folder]
        sys.modules[PRIVATE] = package
    module = importlib.import_module(f"{PRIVATE}.flux_dit")
    return module.FluxDiT.__new__(module.FluxDiT)  # construct_mask/patchify use no weights
