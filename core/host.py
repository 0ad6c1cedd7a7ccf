"""The one contact module with ComfyUI internals.

ComfyUI changes its internals without notice. Everything this package needs from ``comfy.*`` (other
than the public node API in ``comfy_api.latest``) goes through a function here, and each function
checks the capability it relies on (an attribute, a signature, a tensor layout) before using it. A
missing capability raises ``MissingCapability`` naming it and the ComfyUI version, never a raw
AttributeError or IndexError.

Sections are grouped by area; each function says which contact point it is.
"""


class MissingCapability(RuntimeError):
    """ComfyUI lacks something this package relies on; the message names the contact point."""


# --- progress and cancel (issue 13) ---
# (issue 9 adds progress_bar / interrupt_check with the same signatures; keep one copy when merging)

import importlib as _importlib
import inspect as _inspect


def _contact(module_name, attribute, contact):
    try:
        module = _importlib.import_module(module_name)
    except ImportError as error:
        raise MissingCapability(f"{contact}: module {module_name} cannot be imported ({error})") from None
    value = getattr(module, attribute, None)
    if value is None:
        raise MissingCapability(f"{contact}: {module_name}.{attribute} does not exist")
    return value


def progress_bar(total, node_id=None):
    """ComfyUI's node progress bar (contact point: comfy.utils.ProgressBar(total, node_id=))."""
    contact = "utils.ProgressBar(node_id=)"
    bar = _contact("comfy.utils", "ProgressBar", contact)
    if "node_id" not in _inspect.signature(bar).parameters:
        raise MissingCapability(f"{contact}: ProgressBar takes no node_id")
    return bar(total, node_id=node_id)


def interrupt_check():
    """The function that raises when the user pressed Cancel (contact point: comfy.model_management.
    throw_exception_if_processing_interrupted)."""
    return _contact("comfy.model_management", "throw_exception_if_processing_interrupted",
                    "model_management.throw_exception_if_processing_interrupted")


def send_progress_text(text, node_id):
    """A text line under the node in the browser (contact point: server.PromptServer.send_progress_text);
    does nothing without a running server (plain use)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if node_id is not None and instance is not None and hasattr(instance, "send_progress_text"):
        instance.send_progress_text(text, node_id)
