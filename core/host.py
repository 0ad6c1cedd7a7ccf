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


# --- headless loading (issue 12) ---
# The headless trainer (scripts/train.py) loads models the way the stock loader nodes do, through
# ComfyUI's own loading functions, without a server.

import os  # noqa: E402  (this section's own imports, kept with it)

import torch  # noqa: E402

WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")  # UNETLoader's weight_dtype choices


def _require(module, name, contact):
    if not hasattr(module, name):
        raise MissingCapability(f"{contact}: ComfyUI has no {module.__name__}.{name} (version {_comfy_version()})")
    return getattr(module, name)


def _comfy_version():
    try:
        import comfyui_version
        return comfyui_version.__version__
    except Exception:  # an old checkout without the version module
        return "unknown"


def model_file_path(folder, name):
    """Absolute path of a model file as the stock loaders list it (``folder_paths`` names). Only
    safetensors files are accepted: the headless trainer never unpickles."""
    import folder_paths

    if not str(name).endswith(".safetensors"):
        raise ValueError(f"{folder} file {name!r}: only .safetensors files are loaded")
    path = _require(folder_paths, "get_full_path", "model file lookup")(folder, name)
    if path is None:
        places = ", ".join(folder_paths.get_folder_paths(folder)) or "no folder"
        raise ValueError(f"{folder} file {name!r} not found (looked in {places})")
    return path


def add_models_dir(models_dir):
    """Look for model files in ``models_dir/<kind>`` too (the layout of ComfyUI's models folder)."""
    import folder_paths

    add = _require(folder_paths, "add_model_folder_path", "extra models folder")
    for kind in ("diffusion_models", "unet", "checkpoints", "text_encoders", "clip", "vae", "loras", "embeddings"):
        add(kind, os.path.join(models_dir, kind))


def load_diffusion_model_file(name, weight_dtype="default"):
    """UNETLoader: a diffusion model file -> ModelPatcher."""
    import comfy.sd

    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype {weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    options = {}
    if weight_dtype.startswith("fp8_e4m3fn"):
        options["dtype"] = torch.float8_e4m3fn
        if weight_dtype.endswith("_fast"):
            options["fp8_optimizations"] = True
    elif weight_dtype == "fp8_e5m2":
        options["dtype"] = torch.float8_e5m2
    load = _require(comfy.sd, "load_diffusion_model", "diffusion model loader")
    return load(model_file_path("diffusion_models", name), model_options=options)


def load_text_encoder_files(names, clip_type, device="default"):
    """CLIPLoader / DualCLIPLoader: text encoder files -> comfy.sd.CLIP."""
    import comfy.sd
    import folder_paths

    types = _require(comfy.sd, "CLIPType", "text encoder types")
    if not hasattr(types, str(clip_type).upper()):
        raise ValueError(f"text encoder type {clip_type!r} is not known to this ComfyUI")
    options = {}
    if device == "cpu":
        options["load_device"] = options["offload_device"] = torch.device("cpu")
    load = _require(comfy.sd, "load_clip", "text encoder loader")
    return load(ckpt_paths=[model_file_path("text_encoders", n) for n in names],
                embedding_directory=folder_paths.get_folder_paths("embeddings"),
                clip_type=getattr(types, str(clip_type).upper()), model_options=options)


def load_vae_file(name):
    """VAELoader (files only): a VAE file -> comfy.sd.VAE."""
    import comfy.sd
    import comfy.utils

    read = _require(comfy.utils, "load_torch_file", "VAE file reader")
    vae = _require(comfy.sd, "VAE", "VAE class")(sd=read(model_file_path("vae", name), safe_load=True))
    if hasattr(vae, "throw_exception_if_invalid"):
        vae.throw_exception_if_invalid()
    return vae


def load_checkpoint_file(name):
    """CheckpointLoaderSimple: one file -> (ModelPatcher, CLIP, VAE)."""
    import comfy.sd
    import folder_paths

    load = _require(comfy.sd, "load_checkpoint_guess_config", "checkpoint loader")
    out = load(model_file_path("checkpoints", name), output_vae=True, output_clip=True,
               embedding_directory=folder_paths.get_folder_paths("embeddings"))
    return tuple(out[:3])


def select_cuda_device(index):
    """Make ``cuda:index`` the device ComfyUI loads models to (it uses torch's current CUDA device)."""
    import comfy.model_management

    _require(comfy.model_management, "get_torch_device", "torch device selection")
    torch.cuda.set_device(index)
    device = comfy.model_management.get_torch_device()
    if device.type == "cuda" and device.index not in (None, index):
        raise MissingCapability(f"torch device selection: ComfyUI loads to {device}, not cuda:{index}")
    return device
