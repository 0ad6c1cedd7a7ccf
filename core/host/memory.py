"""Memory: ComfyUI's model management (what is loaded where, unloading, loading for training), the
ModelPatcher's patching with every weight on the offload device (block swap), devices, and the module
tensor slots training writes to make inference tensors usable by autograd."""

import torch

from . import HEADLESS, RUNTIME, attribute, comfy_module, contact_point, keyword_parameters, missing

LOAD_FOR_TRAINING = "model_management.load_models_gpu(force_full_load=)"
MEMORY_MANAGEMENT = "model management (free_memory, current_loaded_models, LoadedModel.model_unload)"
PATCH_ON_OFFLOAD = "ModelPatcher.patch_model / unpatch_model (block-swap loading)"


@contact_point("load_models_gpu")
def _load_models_gpu():
    load = attribute(comfy_module("comfy.model_management", LOAD_FOR_TRAINING), "load_models_gpu", LOAD_FOR_TRAINING)
    keyword_parameters(load, ("models", "force_full_load"), LOAD_FOR_TRAINING)
    return load


def load_for_training(patcher):
    """Load a ModelPatcher fully onto its device with patches applied."""
    _load_models_gpu()([patcher], force_full_load=True)


@contact_point(MEMORY_MANAGEMENT)
def _model_management():
    """comfy.model_management with what unloading relies on, checked."""
    mm = comfy_module("comfy.model_management", MEMORY_MANAGEMENT)
    keyword_parameters(attribute(mm, "free_memory", MEMORY_MANAGEMENT), ("memory_required", "device", "keep_loaded"),
                       MEMORY_MANAGEMENT)
    if not isinstance(getattr(mm, "current_loaded_models", None), list):
        raise missing(MEMORY_MANAGEMENT, "comfy.model_management.current_loaded_models is not a list")
    attribute(attribute(mm, "LoadedModel", MEMORY_MANAGEMENT), "model_unload", MEMORY_MANAGEMENT)
    return mm


@contact_point(PATCH_ON_OFFLOAD)
def _check_patch_on_offload():
    patcher = attribute(comfy_module("comfy.model_patcher", PATCH_ON_OFFLOAD), "ModelPatcher", PATCH_ON_OFFLOAD)
    keyword_parameters(attribute(patcher, "patch_model", PATCH_ON_OFFLOAD),
                       ("device_to", "lowvram_model_memory", "load_weights"), PATCH_ON_OFFLOAD)
    keyword_parameters(attribute(patcher, "unpatch_model", PATCH_ON_OFFLOAD), ("device_to", "unpatch_weights"),
                       PATCH_ON_OFFLOAD)
    return patcher


def _as_device(device):
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


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
            entry.model_unload()
            mm.current_loaded_models.pop(index)
            return True
    return False


def patch_weights_on_offload_device(model_patcher):
    """Apply the ModelPatcher's weight and object patches (stock LoRAs etc.) with every weight on its
    offload device (CPU), without registering it as loaded; block swap then moves the resident part to
    the compute device itself. Undo with ``unpatch_weights``."""
    _check_patch_on_offload()
    model_patcher.patch_model(device_to=model_patcher.offload_device, lowvram_model_memory=0, load_weights=True)
    return model_patcher.offload_device


def unpatch_weights(model_patcher):
    """Undo ``patch_weights_on_offload_device``: original weights back, everything on the offload device."""
    model_patcher.unpatch_model(device_to=model_patcher.offload_device, unpatch_weights=True)


@contact_point("module tensor slots (_parameters, _buffers)", RUNTIME)
def alias_inference_tensors(module):
    """Nodes run under ``torch.inference_mode``, so the weights a loader node created are inference
    tensors, which autograd refuses to save for backward. Swap each for a normal tensor sharing the same
    memory (no copy) by writing the module's ``_parameters`` / ``_buffers``; returns what
    ``restore_tensors`` needs to put the originals back."""
    swapped = []
    for owner in module.modules():
        for kind in ("_parameters", "_buffers"):
            for name, tensor in getattr(owner, kind).items():
                if tensor is None or not tensor.is_inference():
                    continue
                alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(
                    tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())
                if kind == "_parameters":
                    alias = torch.nn.Parameter(alias, requires_grad=False)
                getattr(owner, kind)[name] = alias
                swapped.append((owner, kind, name, tensor))
    return swapped


def restore_tensors(swapped):
    for owner, kind, name, tensor in swapped:
        getattr(owner, kind)[name] = tensor


@contact_point("model_patcher.ModelPatcher", RUNTIME)
def wrap_in_patcher(module, kind="unet", load_device=None):
    """A ``ModelPatcher`` around ``module`` on ComfyUI's devices for ``kind`` (``unet`` or ``vae``)."""
    contact = "model_patcher.ModelPatcher"
    patcher_cls = attribute(comfy_module("comfy.model_patcher", contact), "ModelPatcher", contact)
    management = comfy_module("comfy.model_management", contact)
    offload = attribute(management, f"{kind}_offload_device", contact)()
    if load_device is None:
        load_device = attribute(management, "get_torch_device", contact)()
    return patcher_cls(module, load_device=load_device, offload_device=offload)


@contact_point("model_management.intermediate_device", RUNTIME)
def intermediate_device():
    """Where text encoders hand their outputs."""
    contact = "model_management.intermediate_device"
    return attribute(comfy_module("comfy.model_management", contact), "intermediate_device", contact)()


GET_TORCH_DEVICE = "model_management.get_torch_device"


@contact_point(GET_TORCH_DEVICE, HEADLESS)
def _get_torch_device():
    return attribute(comfy_module("comfy.model_management", GET_TORCH_DEVICE), "get_torch_device", GET_TORCH_DEVICE)


def select_cuda_device(index):
    """Make ``cuda:index`` the device ComfyUI loads models to: it uses torch's current CUDA device
    (one process per GPU under torchrun)."""
    get_device = _get_torch_device()
    torch.cuda.set_device(index)
    device = get_device()
    if device.type == "cuda" and device.index not in (None, index):
        raise missing(GET_TORCH_DEVICE, f"it returns {device}, not cuda:{index}, after torch.cuda.set_device({index})")
    return device
