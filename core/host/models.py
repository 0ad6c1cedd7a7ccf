"""Models: ComfyUI's model classes, the diffusion model's forward arguments, DIFFUSION_MODEL wrappers and
block replacements, the FLUX and Qwen-Image block internals the out-of-place training blocks read, model
sampling, the conditioning class entity data rides on, the model configs the tiny models are built
from, and sampling the stock way (what a text encode -> empty latent -> KSampler graph runs)."""

import functools
import importlib.util
import os
import sys

import torch

from . import RUNTIME, attribute, comfy_module, contact_point, keyword_parameters, missing, module_attribute

# -- model classes -------------------------------------------------------------------------------------

MODEL_CLASSES = {
    # what we call it -> (module, class name)
    "BaseModel": ("comfy.model_base", "BaseModel"),
    "Flux model": ("comfy.model_base", "Flux"),
    "QwenImage model": ("comfy.model_base", "QwenImage"),
    "Flux diffusion model": ("comfy.ldm.flux.model", "Flux"),
    "QwenImage diffusion model": ("comfy.ldm.qwen_image.model", "QwenImageTransformer2DModel"),
}


def model_class(name):
    """One of ``MODEL_CLASSES`` (contact point: ComfyUI's model class names)."""
    module, class_name = MODEL_CLASSES[name]
    contact = f"model class {module}.{class_name}"
    return attribute(comfy_module(module, contact), class_name, contact)


@contact_point("model classes")
def _check_model_classes():
    for name in MODEL_CLASSES:
        model_class(name)


def is_base_model(obj):
    return isinstance(obj, model_class("BaseModel"))


@contact_point("ModelPatcher.model", RUNTIME)
def unwrap_patcher(model):
    """The BaseModel a ModelPatcher holds; anything else as it is (a ModelPatcher is told by its
    ``model`` and ``model_options``)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(model, "model_options"):
        return inner
    return model


@contact_point("FluxParams (axes_dim, global_modulation)", RUNTIME)
def flux1_params(diffusion_model):
    """Whether a ``comfy.ldm.flux.model.Flux`` is FLUX.1 (3 RoPE axes, per-block modulation), as opposed
    to FLUX.2 / Chroma-like variants. ``FluxParams.global_modulation`` only exists since 0.3.7x; its
    absence means there is no global modulation."""
    contact = "FluxParams (axes_dim, global_modulation)"
    params = attribute(diffusion_model, "params", contact)
    axes = attribute(params, "axes_dim", contact)
    return len(axes) == 3 and not getattr(params, "global_modulation", False)


@contact_point("FluxParams.guidance_embed", RUNTIME)
def flux_guidance_embedded(diffusion_model):
    """Whether a FLUX model takes an embedded guidance value (FLUX.1-dev yes, schnell no)."""
    contact = "FluxParams.guidance_embed"
    params = attribute(diffusion_model, "params", contact)
    if not hasattr(params, "guidance_embed"):
        raise missing(contact, f"{type(params).__name__} has no guidance_embed")
    return bool(params.guidance_embed)


@contact_point("diffusion model text input width (txt_in.in_features)", RUNTIME)
def context_width(diffusion_model):
    """Width of the text embeddings the diffusion model takes: its ``txt_in`` layer's input features."""
    width = getattr(getattr(diffusion_model, "txt_in", None), "in_features", None)
    if not isinstance(width, int):
        raise missing("diffusion model text input width (txt_in.in_features)",
                      f"{type(diffusion_model).__name__} has no txt_in layer with in_features")
    return width


@contact_point("model_config.unet_config patch_size", RUNTIME)
def patch_size(base_model):
    """The side of the diffusion model's image patches (2 when its config does not say)."""
    config = getattr(getattr(base_model, "model_config", None), "unet_config", None)
    if not isinstance(config, dict):
        raise missing("model_config.unet_config patch_size", f"{type(base_model).__name__} has no model_config.unet_config")
    return int(config.get("patch_size", 2))


# -- forward arguments, wrappers, replacements ---------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _forward_parameters(model_cls):
    contact = f"{model_cls.__name__}._forward arguments (DIFFUSION_MODEL wrapper call)"
    forward = attribute(model_cls, "_forward", contact)
    params = keyword_parameters(forward, ("x", "context", "ref_latents", "transformer_options"), contact)
    return tuple(p for p in params if p != "self")


@contact_point("diffusion model forward arguments")
def _check_forward_arguments():
    for name in ("Flux diffusion model", "QwenImage diffusion model"):
        _forward_parameters(model_class(name))


def forward_argument_index(model_cls, name):
    """Position of argument ``name`` in the positional call the diffusion model's ``forward`` makes to
    its DIFFUSION_MODEL wrappers (``_forward``'s parameter order). None when ``_forward`` has no such
    parameter."""
    params = _forward_parameters(model_cls)
    return params.index(name) if name in params else None


@contact_point("DIFFUSION_MODEL wrapper")
def diffusion_model_wrapper_type():
    contact = "patcher_extension.WrappersMP.DIFFUSION_MODEL"
    return attribute(attribute(comfy_module("comfy.patcher_extension", contact), "WrappersMP", contact),
                     "DIFFUSION_MODEL", contact)


@contact_point("ModelPatcher.get_wrappers", RUNTIME)
def diffusion_model_wrappers(patcher, key):
    """The DIFFUSION_MODEL wrappers registered under ``key`` on a ModelPatcher."""
    return attribute(patcher, "get_wrappers", "ModelPatcher.get_wrappers")(diffusion_model_wrapper_type(), key)


@contact_point("ModelPatcher.add_wrapper_with_key", RUNTIME)
def add_diffusion_model_wrapper(patcher, key, wrapper):
    """Register a DIFFUSION_MODEL wrapper on a ModelPatcher."""
    attribute(patcher, "add_wrapper_with_key", "ModelPatcher.add_wrapper_with_key")(
        diffusion_model_wrapper_type(), key, wrapper)


@contact_point("WrapperExecutor.class_obj", RUNTIME)
def wrapped_diffusion_model(executor):
    """The diffusion model a DIFFUSION_MODEL wrapper's executor runs (its ``class_obj``)."""
    return module_attribute(executor, "class_obj", "WrapperExecutor.class_obj")


@contact_point("transformer_options of a ModelPatcher (model_options, wrappers)", RUNTIME)
def sampling_transformer_options(patcher):
    """The ``transformer_options`` sampling would hand the diffusion model: the patcher's options with
    its wrappers merged in (ModelPatcher.model_options / wrappers, patcher_extension)."""
    contact = "transformer_options of a ModelPatcher (model_options, wrappers)"
    extension = comfy_module("comfy.patcher_extension", contact)
    copy_nested, merge_nested = (attribute(extension, n, contact) for n in ("copy_nested_dicts", "merge_nested_dicts"))
    model_options = attribute(patcher, "model_options", contact)
    options = dict(model_options.get("transformer_options", {}))
    wrappers = copy_nested(options.get("wrappers", {}))
    merge_nested(wrappers, getattr(patcher, "wrappers", {}), copy_dict1=False)
    options["wrappers"] = wrappers
    return options


@contact_point("patches_replace['dit'] keys", RUNTIME)
def with_block_replacements(transformer_options, kind, count, make):
    """A copy of ``transformer_options`` whose ``patches_replace["dit"][(kind, i)]`` is ``make(i, existing)``
    for every block i < count. The input is not modified."""
    options = dict(transformer_options)
    patches_replace = dict(options.get("patches_replace", {}))
    dit = dict(patches_replace.get("dit", {}))
    for index in range(count):
        dit[(kind, index)] = make(index, dit.get((kind, index)))
    patches_replace["dit"] = dit
    options["patches_replace"] = patches_replace
    return options


BLOCK_ARGS = {"double_block": ("img", "txt", "vec", "pe", "transformer_options"),
              "single_block": ("img", "vec", "pe", "transformer_options")}


@contact_point("patches_replace['dit'] block replacement arguments", RUNTIME)
def check_block_args(kind, args, extra=None):
    """What a ``patches_replace["dit"]`` replacement receives: ``args`` with the block inputs and ``extra``
    with ``original_block``."""
    absent = [name for name in BLOCK_ARGS[kind] if name not in args]
    if absent:
        raise missing(f"patches_replace['dit'] {kind} arguments",
                      f"the replacement got {', '.join(sorted(args))} without {', '.join(absent)}")
    if extra is not None and "original_block" not in extra:
        raise missing(f"patches_replace['dit'] {kind} arguments", "extra has no original_block")


@contact_point("diffusion model block lists", RUNTIME)
def block_list(diffusion_model, name):
    """The diffusion model's list of transformer blocks called ``name`` (``double_blocks``,
    ``transformer_blocks``, ...)."""
    blocks = getattr(diffusion_model, name, None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise missing("diffusion model block lists", f"{type(diffusion_model).__name__} has no block list {name}")
    return blocks


# -- FLUX and Qwen-Image block internals (out-of-place training blocks) ----------------------------------

def _parts(owner, names, contact):
    absent = [name for name in names if not hasattr(owner, name)]
    if absent:
        raise missing(contact, f"{type(owner).__name__} has no {', '.join(absent)}")
    return {name: getattr(owner, name) for name in names}


def _flux_block_modulated(block, contact):
    # 0.3.75 marks double blocks with a bool ``modulation`` and single blocks with ``modulation`` = None;
    # 0.3.64 always has per-block modulation (``img_mod`` / a Modulation module).
    if not hasattr(block, "modulation"):
        if hasattr(block, "img_mod"):  # a 0.3.64 double block
            return True
        raise missing(contact, f"{type(block).__name__} has neither modulation nor img_mod")
    modulation = block.modulation
    if isinstance(modulation, bool):  # 0.3.75 double block
        return modulation
    return modulation is not None  # single block: a Modulation module, or None without one


class BlockParts(dict):
    """A block's parts by name, read as attributes (``parts.img_mod``)."""

    __getattr__ = dict.__getitem__


FLUX_DOUBLE_PARTS = ("num_heads", "flipped_img_txt", "img_mod", "txt_mod", "img_norm1", "txt_norm1", "img_attn",
                     "txt_attn", "img_norm2", "txt_norm2", "img_mlp", "txt_mlp")
FLUX_ATTENTION_PARTS = ("qkv", "norm", "proj")
FLUX_SINGLE_PARTS = ("num_heads", "hidden_size", "modulation", "pre_norm", "linear1", "linear2", "norm", "mlp_act")


@contact_point("FLUX double block parts", RUNTIME)
def flux_double_block_parts(block):
    """The parts of a FLUX ``DoubleStreamBlock`` the out-of-place block computes with (FLUX_DOUBLE_PARTS,
    each attention's FLUX_ATTENTION_PARTS) and ``modulated``: whether it has per-block modulation
    (FLUX.1); without it the other parts are not read."""
    contact = "FLUX double block parts"
    if not _flux_block_modulated(block, contact):
        return BlockParts(modulated=False)
    parts = BlockParts(_parts(block, FLUX_DOUBLE_PARTS, contact), modulated=True)
    for name in ("img_attn", "txt_attn"):
        _parts(parts[name], FLUX_ATTENTION_PARTS, f"{contact} ({name})")
    return parts


@contact_point("FLUX single block parts", RUNTIME)
def flux_single_block_parts(block):
    """The parts of a FLUX ``SingleStreamBlock`` (FLUX_SINGLE_PARTS), ``modulated`` as for double blocks,
    and ``mlp_width``: the width of the MLP input half of ``linear1`` (``mlp_hidden_dim_first`` in
    0.3.75, ``mlp_hidden_dim`` before)."""
    contact = "FLUX single block parts"
    if not _flux_block_modulated(block, contact):
        return BlockParts(modulated=False)
    width = next((getattr(block, name) for name in ("mlp_hidden_dim_first", "mlp_hidden_dim")
                  if getattr(block, name, None) is not None), None)
    if width is None:
        raise missing(contact, f"{type(block).__name__} has no mlp_hidden_dim_first or mlp_hidden_dim")
    return BlockParts(_parts(block, FLUX_SINGLE_PARTS, contact), modulated=True, mlp_width=int(width))


@contact_point("FLUX blocks")
def _check_flux_blocks():
    layers = comfy_module("comfy.ldm.flux.layers", "FLUX blocks")
    for cls in ("DoubleStreamBlock", "SingleStreamBlock"):
        keyword_parameters(attribute(layers, cls, "FLUX blocks").forward, ("pe", "attn_mask", "transformer_options"),
                           f"FLUX {cls}.forward(transformer_options=)")


@functools.lru_cache(maxsize=None)
def _qwen_block_parameters(block_cls):
    contact = "Qwen-Image block forward(transformer_options=)"
    return keyword_parameters(block_cls.forward, ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask",
                                                  "temb", "image_rotary_emb", "transformer_options"), contact)


@contact_point("Qwen-Image block")
def _check_qwen_block():
    module = comfy_module("comfy.ldm.qwen_image.model", "Qwen-Image block")
    _qwen_block_parameters(attribute(module, "QwenImageTransformerBlock", "Qwen-Image block"))


def qwen_image_block(block, img, txt, vec, pe, transformer_options):
    """One Qwen-Image transformer block -> (txt, img) (checked by the "Qwen-Image block" start-up check)."""
    _qwen_block_parameters(type(block))
    return block(hidden_states=img, encoder_hidden_states=txt, encoder_hidden_states_mask=None, temb=vec,
                 image_rotary_emb=pe, transformer_options=transformer_options)


@contact_point("Qwen-Image pe layout", RUNTIME)
def rope_sequence_axis(pe):
    """The sequence axis of a Qwen-Image ``pe`` tensor: 2 for ``[B, 1, S, d/2, 2, 2]`` (0.3.75), 1 for
    ``[B, S, 1, d/2, 2, 2]`` (0.3.64)."""
    shape = tuple(pe.shape)
    if len(shape) == 6 and shape[-2:] == (2, 2):
        if shape[1] == 1 and shape[2] != 1:
            return 2
        if shape[2] == 1:
            return 1
    raise missing("Qwen-Image pe layout", f"pe has shape {list(shape)}; expected [B, 1, S, d/2, 2, 2] or "
                                          f"[B, S, 1, d/2, 2, 2]")


# -- model sampling and dtypes --------------------------------------------------------------------------

MODEL_SAMPLING = "BaseModel.model_sampling (timestep, percent_to_sigma)"


@contact_point(MODEL_SAMPLING, RUNTIME)
def model_sampling(base_model):
    """A BaseModel's ``model_sampling`` with the methods read here."""
    sampling = attribute(base_model, "model_sampling", MODEL_SAMPLING)
    for name in ("timestep", "percent_to_sigma"):
        attribute(sampling, name, MODEL_SAMPLING)
    return sampling


def timestep(base_model, sigma):
    """The model's timestep input for noise level ``sigma``."""
    return model_sampling(base_model).timestep(sigma)


def percent_to_sigma(base_model, percent):
    """The sigma at ``percent`` of sampling (ComfyUI's start/end_percent meaning)."""
    return float(model_sampling(base_model).percent_to_sigma(percent))


@contact_point("samplers.calculate_sigmas", RUNTIME)
def simple_sigmas(model_sampling, steps):
    """The ``simple`` schedule's sigmas (steps + 1 values)."""
    contact = "samplers.calculate_sigmas"
    calculate = attribute(comfy_module("comfy.samplers", contact), "calculate_sigmas", contact)
    return calculate(model_sampling, "simple", steps)


@contact_point("BaseModel.manual_cast_dtype / get_dtype", RUNTIME)
def compute_dtype(base_model):
    """The dtype the model computes in, as BaseModel.apply_model casts: fp8 weights run in their cast dtype."""
    contact = "BaseModel.manual_cast_dtype / get_dtype"
    if not hasattr(base_model, "manual_cast_dtype"):
        raise missing(contact, f"{type(base_model).__name__} has no manual_cast_dtype")
    return base_model.manual_cast_dtype or attribute(base_model, "get_dtype", contact)()


# -- conditioning and model configs ----------------------------------------------------------------------

@contact_point("conds.CONDRegular")
def regular_cond_class():
    """``comfy.conds.CONDRegular``: the base of per-conditioning data that reaches the diffusion model as a
    keyword argument."""
    contact = "conds.CONDRegular (model_conds)"
    cls = attribute(comfy_module("comfy.conds", contact), "CONDRegular", contact)
    for name in ("can_concat", "concat", "process_cond"):
        attribute(cls, name, contact)
    return cls


@contact_point("supported_models configs", RUNTIME)
def supported_model_config(name):
    """A model config class of ``comfy.supported_models`` (``Flux``, ``QwenImage``), used to build tiny
    models without a checkpoint."""
    contact = f"supported_models.{name}"
    cls = attribute(comfy_module("comfy.supported_models", contact), name, contact)
    for method in ("set_inference_dtype", "get_model", "latent_format"):
        attribute(cls, method, contact)
    return cls


# -- sampling the stock way (what a CLIPTextEncode -> EmptyLatentImage -> KSampler graph runs) ----------

def _builtin_nodes(contact):
    """ComfyUI's own ``nodes`` module (the V1 built-in nodes). Inside the server it is loaded; elsewhere
    it is loaded from beside ``folder_paths``, because a bare ``import nodes`` can find this package's
    ``nodes/`` folder first when the repository folder is on ``sys.path``."""
    module = sys.modules.get("nodes")
    if module is not None and hasattr(module, "NODE_CLASS_MAPPINGS"):
        return module
    root = os.path.dirname(attribute(comfy_module("folder_paths", contact), "__file__", contact))
    spec = importlib.util.spec_from_file_location("nodes", os.path.join(root, "nodes.py"))
    if spec is None or not os.path.isfile(os.path.join(root, "nodes.py")):
        raise missing(contact, f"no nodes.py beside folder_paths in {root}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["nodes"] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules["nodes"]
        raise
    return module


@contact_point("nodes.CLIPTextEncode.encode", RUNTIME)
def encode_prompt(clip, text):
    """CONDITIONING of a prompt, the way the stock CLIP Text Encode node makes it (the V1 node class)."""
    contact = "nodes.CLIPTextEncode.encode"
    node = attribute(_builtin_nodes(contact), "CLIPTextEncode", contact)
    return attribute(node(), "encode", contact)(clip, text)[0]


@contact_point("nodes.EmptyLatentImage / sample.fix_empty_latent_channels", RUNTIME)
def empty_latent(model, width, height, batch=1, downscale_ratio=8):
    """An empty latent for ``model`` (stock EmptyLatentImage, channels fixed for the model the way
    KSampler does). The node assumes an 8x VAE; for another ``downscale_ratio`` (toy VAEs) the same zeros
    are made at that ratio."""
    if downscale_ratio == 8:
        contact = "nodes.EmptyLatentImage.generate"
        node = attribute(_builtin_nodes(contact), "EmptyLatentImage", contact)
        latent = attribute(node(), "generate", contact)(width, height, batch)[0]["samples"]
    else:
        latent = torch.zeros([batch, 4, height // downscale_ratio, width // downscale_ratio])
    fix = attribute(comfy_module("comfy.sample", "sample.fix_empty_latent_channels"), "fix_empty_latent_channels",
                    "sample.fix_empty_latent_channels")
    return fix(model, latent)


@contact_point("sample.prepare_noise / sample.sample", RUNTIME)
def sample_latent(model, latent, seed, steps, cfg, sampler_name, scheduler, positive, negative):
    """What KSampler runs: noise from ``seed`` and ``comfy.sample.sample``."""
    contact = "sample.prepare_noise / sample.sample"
    sample = comfy_module("comfy.sample", contact)
    noise = attribute(sample, "prepare_noise", contact)(latent, seed)
    return attribute(sample, "sample", contact)(model, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                                                latent, denoise=1.0, disable_pbar=True, seed=seed)
