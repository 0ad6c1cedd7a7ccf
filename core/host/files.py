"""Files and server: ComfyUI's folder_paths (inputs, outputs, LoRA files, numbered output names), the
server's progress bar, cancel check and progress text, and loading model files as the stock loader nodes
do, without a server (the headless trainer, scripts/train.py)."""

import importlib
import os

import torch

from . import HEADLESS, RUNTIME, attribute, comfy_module, contact_point, encoders, keyword_parameters, missing

# -- model and output folders ----------------------------------------------------------------------------

FOLDER_PATHS = "folder_paths"


def _folder_function(name):
    return attribute(comfy_module("folder_paths", FOLDER_PATHS), name, f"{FOLDER_PATHS}.{name}")


@contact_point(FOLDER_PATHS)
def _check_folder_paths():
    for name in ("get_input_directory", "get_output_directory", "get_folder_paths", "get_filename_list",
                 "get_full_path_or_raise", "get_save_image_path"):
        _folder_function(name)


def input_directory():
    return _folder_function("get_input_directory")()


def output_directory():
    return _folder_function("get_output_directory")()


def lora_folder():
    """The first folder ComfyUI lists LoRAs from (models/loras, or the user's first extra path)."""
    folders = _folder_function("get_folder_paths")("loras")
    if not folders:
        raise missing(f"{FOLDER_PATHS}.get_folder_paths('loras')", "ComfyUI lists no LoRA folder")
    return folders[0]


def lora_file_names():
    return _folder_function("get_filename_list")("loras")


def lora_path(name):
    """The full path of a LoRA file ComfyUI lists (its own error when the file is gone)."""
    return _folder_function("get_full_path_or_raise")("loras", name)


def save_image_path(prefix, folder):
    """(folder, file name stem, counter) for a numbered output image, as ComfyUI's SaveImage picks them."""
    folder, name, counter, _, _ = _folder_function("get_save_image_path")(prefix, folder)
    return folder, name, counter


# -- the server: progress, cancel ----------------------------------------------------------------------

@contact_point("utils.ProgressBar(node_id=)", RUNTIME)
def progress_bar(total, node_id=None):
    """ComfyUI's node progress bar."""
    contact = "utils.ProgressBar(node_id=)"
    bar = attribute(comfy_module("comfy.utils", contact), "ProgressBar", contact)
    keyword_parameters(bar, ("total", "node_id"), contact)
    return bar(total, node_id=node_id)


@contact_point("model_management.throw_exception_if_processing_interrupted", RUNTIME)
def interrupt_check():
    """The function that raises when the user pressed Cancel."""
    contact = "model_management.throw_exception_if_processing_interrupted"
    return attribute(comfy_module("comfy.model_management", contact), "throw_exception_if_processing_interrupted",
                     contact)


@contact_point("server.PromptServer.send_progress_text", RUNTIME)
def send_progress_text(text, node_id):
    """Show ``text`` on node ``node_id`` in the browser. Cosmetic: without a server, or in a ComfyUI
    without the method, it does nothing and says so by returning False."""
    if node_id is None:
        return False
    try:
        server = importlib.import_module("server")
    except ImportError:  # plain use without a server: the log line is enough
        return False
    send = getattr(getattr(getattr(server, "PromptServer", None), "instance", None), "send_progress_text", None)
    if send is None:
        return False
    send(text, node_id)
    return True


# -- loading model files without a server ----------------------------------------------------------------
# The headless trainer loads models as the stock loader nodes do, through ComfyUI's own loading functions.
# Its contact points are checked by the tests, not at start-up: only scripts/train.py needs them.

WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")  # UNETLoader's weight_dtype choices


def _headless_function(module, name, arguments, contact):
    function = attribute(comfy_module(module, contact), name, contact)
    if arguments:
        keyword_parameters(function, arguments, contact)
    return function


@contact_point("folder_paths.get_full_path", HEADLESS)
def _get_full_path():
    return _headless_function("folder_paths", "get_full_path", (), "folder_paths.get_full_path")


@contact_point("folder_paths.add_model_folder_path", HEADLESS)
def _add_model_folder_path():
    return _headless_function("folder_paths", "add_model_folder_path", (), "folder_paths.add_model_folder_path")


@contact_point("sd.load_diffusion_model(model_options=)", HEADLESS)
def _load_diffusion_model():
    return _headless_function("comfy.sd", "load_diffusion_model", ("model_options",),
                              "sd.load_diffusion_model(model_options=)")


@contact_point("sd.load_clip(ckpt_paths=, clip_type=)", HEADLESS)
def _load_clip():
    return _headless_function("comfy.sd", "load_clip", ("ckpt_paths", "embedding_directory", "clip_type", "model_options"),
                              "sd.load_clip(ckpt_paths=, clip_type=)")


@contact_point("sd.CLIPType", HEADLESS)
def _clip_types():
    return _headless_function("comfy.sd", "CLIPType", (), "sd.CLIPType")


@contact_point("utils.load_torch_file(safe_load=)", HEADLESS)
def _load_torch_file():
    return _headless_function("comfy.utils", "load_torch_file", ("safe_load",), "utils.load_torch_file(safe_load=)")


@contact_point("sd.load_checkpoint_guess_config", HEADLESS)
def _load_checkpoint():
    return _headless_function("comfy.sd", "load_checkpoint_guess_config",
                              ("output_vae", "output_clip", "embedding_directory"), "sd.load_checkpoint_guess_config")


def model_file_path(folder, name):
    """Absolute path of a model file as the stock loaders list it. Only safetensors files are accepted:
    the headless trainer never unpickles."""
    if not str(name).endswith(".safetensors"):
        raise ValueError(f"{folder} file {name!r}: only .safetensors files are loaded")
    path = _get_full_path()(folder, name)
    if path is None:
        places = ", ".join(_folder_function("get_folder_paths")(folder)) or "no folder"
        raise ValueError(f"{folder} file {name!r} not found (looked in {places})")
    return path


def add_models_dir(models_dir):
    """Look for model files in ``models_dir/<kind>`` too, ComfyUI's models layout."""
    add = _add_model_folder_path()
    for kind in ("diffusion_models", "unet", "checkpoints", "text_encoders", "clip", "vae", "loras", "embeddings"):
        add(kind, os.path.join(models_dir, kind))


def load_diffusion_model_file(name, weight_dtype="default"):
    """UNETLoader: a diffusion model file -> ModelPatcher."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype {weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    options = {}
    if weight_dtype.startswith("fp8_e4m3fn"):
        options["dtype"] = torch.float8_e4m3fn
        if weight_dtype.endswith("_fast"):
            options["fp8_optimizations"] = True
    elif weight_dtype == "fp8_e5m2":
        options["dtype"] = torch.float8_e5m2
    return _load_diffusion_model()(model_file_path("diffusion_models", name), model_options=options)


def load_text_encoder_files(names, clip_type, device="default"):
    """CLIPLoader / DualCLIPLoader: text encoder files -> CLIP."""
    types = _clip_types()
    if not hasattr(types, str(clip_type).upper()):
        raise ValueError(f"text encoder type {clip_type!r} is not known to this ComfyUI")
    options = {}
    if device == "cpu":
        options["load_device"] = options["offload_device"] = torch.device("cpu")
    return _load_clip()(ckpt_paths=[model_file_path("text_encoders", n) for n in names],
                        embedding_directory=_folder_function("get_folder_paths")("embeddings"),
                        clip_type=getattr(types, str(clip_type).upper()), model_options=options)


def load_vae_file(name):
    """VAELoader (files only): a VAE file -> VAE."""
    vae = encoders.vae_class()(sd=_load_torch_file()(model_file_path("vae", name), safe_load=True))
    if hasattr(vae, "throw_exception_if_invalid"):
        vae.throw_exception_if_invalid()
    return vae


def load_checkpoint_file(name):
    """CheckpointLoaderSimple: one file -> (ModelPatcher, CLIP, VAE)."""
    out = _load_checkpoint()(model_file_path("checkpoints", name), output_vae=True, output_clip=True,
                             embedding_directory=_folder_function("get_folder_paths")("embeddings"))
    return tuple(out[:3])
