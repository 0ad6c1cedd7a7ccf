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
