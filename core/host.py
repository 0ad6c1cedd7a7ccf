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


# --- memory: encoders off the device, block-swap loading (issue 11) ---


def _model_management():
    import comfy.model_management as mm

    for name in ("free_memory", "current_loaded_models", "unet_offload_device"):
        if not hasattr(mm, name):
            raise MissingCapability(f"comfy.model_management.{name} (memory management) is missing")
    return mm


def loaded_models_on(device):
    """The ModelPatchers ComfyUI's model management holds loaded on ``device`` (its own
    ``current_loaded_models`` list)."""
    mm = _model_management()
    device = _as_device(device)
    return [entry.model for entry in mm.current_loaded_models
            if _as_device(entry.device) == device and entry.model is not None]


def unload_models_on(device, keep=()):
    """Ask ComfyUI's model management to unload every model it holds on ``device`` except the
    ModelPatchers in ``keep`` (text encoders, VAE, other diffusion models leave the device).
    Returns how many it unloaded."""
    mm = _model_management()
    device = _as_device(device)
    keep_entries = [entry for entry in mm.current_loaded_models
                    if any(entry.model is k for k in keep)]
    # free_memory with an unreachable requirement unloads everything it may, in its own order and with
    # its own bookkeeping (unpatching LoRA weights, moving to the offload device).
    unloaded = mm.free_memory(1e30, device, keep_loaded=keep_entries)
    return len(unloaded)


def unload_model(model_patcher):
    """Unload one ModelPatcher (e.g. the VAE after validation images) if ComfyUI holds it loaded."""
    mm = _model_management()
    for index, entry in enumerate(list(mm.current_loaded_models)):
        if entry.model is model_patcher:
            if not hasattr(entry, "model_unload"):
                raise MissingCapability("comfy.model_management.LoadedModel.model_unload is missing")
            entry.model_unload()
            mm.current_loaded_models.pop(index)
            return True
    return False


def patch_weights_on_offload_device(model_patcher):
    """Apply the ModelPatcher's weight and object patches (stock LoRAs etc.) with every weight on its
    offload device (CPU), without registering it as loaded; block swap then moves the resident part to
    the compute device itself. Undo with ``unpatch_weights``."""
    for name in ("patch_model", "unpatch_model", "offload_device"):
        if not hasattr(model_patcher, name):
            raise MissingCapability(f"ModelPatcher.{name} is missing (needed to load a model for block swap)")
    model_patcher.patch_model(device_to=model_patcher.offload_device, lowvram_model_memory=0, load_weights=True)
    return model_patcher.offload_device


def unpatch_weights(model_patcher):
    """Undo ``patch_weights_on_offload_device``: original weights back, everything on the offload device."""
    model_patcher.unpatch_model(device_to=model_patcher.offload_device, unpatch_weights=True)


def _as_device(device):
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
