"""peft, the one dependency only training needs: checked without importing it, imported only by training.

ComfyUI's own requirements do not include peft, and a pack whose import fails loses every node, so
nothing outside training imports peft. When it is missing or older than ``MINIMUM``, the other nodes
work, ComfyUI's start-up log gets one line (``startup_report``), and training stops before any work with
``PeftUnavailable`` naming what is wrong and the one command that fixes it for the Python running now.
"""

import importlib
import importlib.metadata
import logging
import re
import sys

REQUIREMENT = "peft>=0.13"  # as in requirements.txt and pyproject.toml (a test keeps the three equal)


class PeftUnavailable(ImportError):
    """peft is missing, too old or broken; the message says which and the command that installs it."""


def release(text):
    """``"0.13.2"`` -> ``(0, 13, 2)``, ``"0.14.0.dev0"`` -> ``(0, 14, 0)``: the leading release numbers."""
    found = re.match(r"\d+(\.\d+)*", text.strip())
    return tuple(int(part) for part in found.group(0).split(".")) if found else ()


MINIMUM = release(REQUIREMENT.partition(">=")[2])


def installed_version():
    """The installed peft's version string, None when this Python has no peft."""
    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return None


def install_command(python=None):
    """The pip command that installs the required peft into ``python`` (default: the running one)."""
    python = python or sys.executable
    quoted = f'"{python}"' if re.search(r"\s", python) else python
    return f'{quoted} -m pip install "{REQUIREMENT}"'


def problem(version, python=None):
    """What is wrong with a peft of ``version`` (None: not installed) in ``python`` (default: the running
    one), ending in the command that fixes it; None when it is recent enough."""
    python = python or sys.executable
    if version and release(version) >= MINIMUM:
        return None
    found = "has no peft" if not version else f"has peft {version}"
    return (f"EliGen training needs {REQUIREMENT} and the Python that runs ComfyUI ({python}) {found}. Install "
            f"it with: {install_command(python)} and restart ComfyUI. Every other EliGen node works without it.")


def startup_report(log=logging.getLogger("comfyui_eligen")):
    """One warning line when training cannot run for want of peft (nothing when it can). Reads only the
    installed version: importing peft here would slow every ComfyUI start."""
    text = problem(installed_version())
    if text:
        log.warning("EliGen: EliGen Train LoRA will not run: %s", text)
    return text


def import_peft():
    """The peft module, or ``PeftUnavailable`` saying what is missing and how to install it."""
    text = problem(installed_version())
    if text:
        raise PeftUnavailable(text)
    try:
        return importlib.import_module("peft")
    except Exception as error:  # installed, yet broken (e.g. a dependency of the wrong version)
        raise PeftUnavailable(
            f"EliGen training needs {REQUIREMENT}; peft {installed_version()} is installed in {sys.executable} "
            f"but does not import ({type(error).__name__}: {error}). Fix what the error names, or reinstall "
            f"peft alone: {install_command()} --force-reinstall --no-deps; then restart ComfyUI.") from error
