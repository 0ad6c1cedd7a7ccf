"""The one contact module with ComfyUI internals.

ComfyUI changes its internals without notice. Everything this package needs from ``comfy.*`` (other
than the public node API in ``comfy_api.latest``) goes through a function here, and each function
checks the capability it relies on (an attribute, a signature, a tensor layout) before using it. A
missing capability raises ``MissingCapability`` naming it and the ComfyUI version, never a raw
AttributeError or IndexError.

Sections are grouped by area; each function says which contact point it is.
"""

import functools
import importlib
import importlib.util
import inspect
import logging
import os
import re
import sys

import torch


class MissingCapability(RuntimeError):
    """ComfyUI lacks something this package relies on; the message names the contact point."""


# --- contact points (issue 9) ---
# Each public function below is one contact point. ``CONTACTS`` lists a check per contact point; the
# start-up report and tests/test_host_contracts.py run them all.

TESTED_VERSIONS = ("0.3.64", "0.3.75")  # each one runs the server tests in CI or locally (README, "ComfyUI versions")
UNKNOWN_VERSION = "unknown"


@functools.lru_cache(maxsize=None)
def comfyui_version():
    """ComfyUI's version string from its ``comfyui_version.py`` (``unknown`` when the file is absent)."""
    try:
        return str(importlib.import_module("comfyui_version").__version__)
    except (ImportError, AttributeError):
        return UNKNOWN_VERSION


def version_tuple(text):
    """``"0.3.64"`` -> ``(0, 3, 64)``; None when the text is not a dotted version."""
    parts = re.findall(r"\d+", text or "")
    return tuple(int(p) for p in parts[:3]) if parts else None


def tested_range_text():
    return f"{TESTED_VERSIONS[0]} to {TESTED_VERSIONS[-1]}"


def missing(contact, detail):
    """The MissingCapability for ``contact`` (the contact point's name) with what was found instead."""
    error = MissingCapability(
        f"EliGen cannot use ComfyUI {comfyui_version()}: {contact}: {detail} (EliGen is tested with ComfyUI "
        f"{tested_range_text()})")
    error.contact, error.detail = contact, detail
    return error


def _module(name, contact):
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise missing(contact, f"module {name} cannot be imported ({error})") from None


def _attribute(owner, name, contact):
    value = getattr(owner, name, None)
    if value is None:
        where = getattr(owner, "__name__", type(owner).__name__)
        raise missing(contact, f"{where}.{name} does not exist")
    return value


def _parameters(function, names, contact):
    """Check that ``function`` takes the keyword arguments ``names``; returns its parameter names."""
    try:
        params = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        raise missing(contact, f"{getattr(function, '__qualname__', function)} has no readable signature") from None
    absent = [n for n in names if n not in params]
    if absent:
        raise missing(contact, f"{getattr(function, '__qualname__', function)} takes no {', '.join(absent)} "
                               f"(it takes {', '.join(params)})")
    return params


# -- model classes ---------------------------------------------------------------------------------

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
    module, attribute = MODEL_CLASSES[name]
    contact = f"model class {module}.{attribute}"
    return _attribute(_module(module, contact), attribute, contact)


def is_base_model(obj):
    return isinstance(obj, model_class("BaseModel"))


def flux1_params(diffusion_model):
    """Whether a ``comfy.ldm.flux.model.Flux`` is FLUX.1 (3 RoPE axes, per-block modulation), as opposed
    to FLUX.2 / Chroma-like variants. ``FluxParams.global_modulation`` only exists since 0.3.7x; its
    absence means there is no global modulation (contact point: FluxParams)."""
    contact = "FluxParams (axes_dim, global_modulation)"
    params = _attribute(diffusion_model, "params", contact)
    axes = _attribute(params, "axes_dim", contact)
    return len(axes) == 3 and not getattr(params, "global_modulation", False)


@functools.lru_cache(maxsize=None)
def _forward_parameters(model_cls):
    contact = f"{model_cls.__name__}._forward arguments (DIFFUSION_MODEL wrapper call)"
    forward = _attribute(model_cls, "_forward", contact)
    params = _parameters(forward, ("x", "context", "ref_latents", "transformer_options"), contact)
    return tuple(p for p in params if p != "self")


def forward_argument_index(model_cls, name):
    """Position of argument ``name`` in the positional call the diffusion model's ``forward`` makes to
    its DIFFUSION_MODEL wrappers (``_forward``'s parameter order; contact point: forward argument
    indices). None when ``_forward`` has no such parameter."""
    params = _forward_parameters(model_cls)
    return params.index(name) if name in params else None


# -- wrappers, options, replacements ---------------------------------------------------------------

def diffusion_model_wrapper_type():
    contact = "patcher_extension.WrappersMP.DIFFUSION_MODEL"
    return _attribute(_attribute(_module("comfy.patcher_extension", contact), "WrappersMP", contact),
                      "DIFFUSION_MODEL", contact)


def diffusion_model_wrappers(patcher, key):
    """The DIFFUSION_MODEL wrappers registered under ``key`` on a ModelPatcher."""
    contact = "ModelPatcher.get_wrappers"
    return _attribute(patcher, "get_wrappers", contact)(diffusion_model_wrapper_type(), key)


def add_diffusion_model_wrapper(patcher, key, wrapper):
    """Register a DIFFUSION_MODEL wrapper on a ModelPatcher (contact point: the wrapper mechanism)."""
    contact = "ModelPatcher.add_wrapper_with_key"
    _attribute(patcher, "add_wrapper_with_key", contact)(diffusion_model_wrapper_type(), key, wrapper)


def sampling_transformer_options(patcher):
    """The ``transformer_options`` sampling would hand the diffusion model: the patcher's options with
    its wrappers merged in (contact point: ModelPatcher.model_options / wrappers, patcher_extension)."""
    contact = "transformer_options of a ModelPatcher (model_options, wrappers)"
    extension = _module("comfy.patcher_extension", contact)
    copy_nested, merge_nested = (_attribute(extension, n, contact) for n in ("copy_nested_dicts", "merge_nested_dicts"))
    model_options = _attribute(patcher, "model_options", contact)
    options = dict(model_options.get("transformer_options", {}))
    wrappers = copy_nested(options.get("wrappers", {}))
    merge_nested(wrappers, getattr(patcher, "wrappers", {}), copy_dict1=False)
    options["wrappers"] = wrappers
    return options


def with_block_replacements(transformer_options, kind, count, make):
    """A copy of ``transformer_options`` whose ``patches_replace["dit"][(kind, i)]`` is ``make(i, existing)``
    for every block i < count (contact point: patches_replace["dit"] keys). The input is not modified."""
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


def check_block_args(kind, args, extra=None):
    """What a ``patches_replace["dit"]`` replacement receives: ``args`` with the block inputs and ``extra``
    with ``original_block`` (contact point: block replacement arguments)."""
    absent = [name for name in BLOCK_ARGS[kind] if name not in args]
    if absent:
        raise missing(f"patches_replace['dit'] {kind} arguments",
                      f"the replacement got {', '.join(sorted(args))} without {', '.join(absent)}")
    if extra is not None and "original_block" not in extra:
        raise missing(f"patches_replace['dit'] {kind} arguments", "extra has no original_block")


# -- attention -------------------------------------------------------------------------------------

ATTENTION_OVERRIDE_KEY = "optimized_attention_override"


def with_attention_override(transformer_options, make):
    """A copy of ``transformer_options`` whose attention override is ``make(existing override or None)``
    (contact point: transformer_options['optimized_attention_override'])."""
    options = dict(transformer_options)
    options[ATTENTION_OVERRIDE_KEY] = make(options.get(ATTENTION_OVERRIDE_KEY))
    return options


@functools.lru_cache(maxsize=None)
def check_attention_override():
    """ComfyUI's attention functions call ``transformer_options["optimized_attention_override"]`` (added
    in 0.3.6x; without it no entity mask can reach every attention call). Checked by calling the attention
    function on tiny tensors with a probe override (contact point: optimized_attention_override)."""
    contact = "transformer_options['optimized_attention_override']"
    attention = _module("comfy.ldm.modules.attention", contact)
    function = _attribute(attention, "optimized_attention", contact)
    calls = []

    def probe(func, *args, **kwargs):
        calls.append(("mask" in kwargs or len(args) > 4, "transformer_options" in kwargs))
        return args[0]

    q = torch.zeros(1, 2, 4)
    try:
        function(q, q, q, 1, mask=None, transformer_options={"optimized_attention_override": probe})
    except TypeError as error:
        raise missing(contact, f"the attention function does not take transformer_options ({error})") from None
    if not calls:
        raise missing(contact, "the attention function ignores the override")
    if not calls[0][1]:
        raise missing(contact, "the override is called without transformer_options")
    return True


def flux_attention(q, k, v, pe, mask, transformer_options):
    """``comfy.ldm.flux.math.attention`` with ``transformer_options`` (so the entity override applies;
    contact point: FLUX attention function)."""
    return _flux_attention_function()(q, k, v, pe=pe, mask=mask, transformer_options=transformer_options)


@functools.lru_cache(maxsize=None)
def _flux_attention_function():
    contact = "comfy.ldm.flux.math.attention(transformer_options=)"
    function = _attribute(_module("comfy.ldm.flux.math", contact), "attention", contact)
    _parameters(function, ("q", "k", "v", "pe", "mask", "transformer_options"), contact)
    return function


# -- FLUX and Qwen-Image block internals (out-of-place training blocks) ------------------------------

def flux_block_modulated(block):
    """Whether a FLUX block has its own modulation (FLUX.1). 0.3.75 marks double blocks with a bool
    ``modulation`` and single blocks with ``modulation`` = None; 0.3.64 always has per-block modulation
    (``img_mod`` / a Modulation module). Contact point: FLUX block modulation."""
    if not hasattr(block, "modulation"):
        if hasattr(block, "img_mod"):  # a 0.3.64 double block
            return True
        raise missing("FLUX block modulation", f"{type(block).__name__} has neither modulation nor img_mod")
    modulation = block.modulation
    if isinstance(modulation, bool):  # 0.3.75 double block
        return modulation
    return modulation is not None  # single block: a Modulation module, or None without one


def flux_single_mlp_width(block):
    """Width of the MLP input half of a FLUX single block's ``linear1`` (``mlp_hidden_dim_first`` in
    0.3.75, ``mlp_hidden_dim`` before; contact point: FLUX single block MLP width)."""
    for name in ("mlp_hidden_dim_first", "mlp_hidden_dim"):
        width = getattr(block, name, None)
        if width is not None:
            return int(width)
    raise missing("FLUX single block MLP width", f"{type(block).__name__} has no mlp_hidden_dim_first or mlp_hidden_dim")


@functools.lru_cache(maxsize=None)
def _qwen_block_parameters(block_cls):
    contact = "Qwen-Image block forward(transformer_options=)"
    return _parameters(block_cls.forward, ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask",
                                           "temb", "image_rotary_emb", "transformer_options"), contact)


def qwen_image_block(block, img, txt, vec, pe, transformer_options):
    """One Qwen-Image transformer block -> (txt, img) (contact point: Qwen-Image block call)."""
    _qwen_block_parameters(type(block))
    return block(hidden_states=img, encoder_hidden_states=txt, encoder_hidden_states_mask=None, temb=vec,
                 image_rotary_emb=pe, transformer_options=transformer_options)


def rope_sequence_axis(pe):
    """The sequence axis of a Qwen-Image ``pe`` tensor: 2 for ``[B, 1, S, d/2, 2, 2]`` (0.3.75), 1 for
    ``[B, S, 1, d/2, 2, 2]`` (0.3.64) (contact point: Qwen-Image pe layout)."""
    shape = tuple(pe.shape)
    if len(shape) == 6 and shape[-2:] == (2, 2):
        if shape[1] == 1 and shape[2] != 1:
            return 2
        if shape[2] == 1:
            return 1
    raise missing("Qwen-Image pe layout", f"pe has shape {list(shape)}; expected [B, 1, S, d/2, 2, 2] or "
                                          f"[B, S, 1, d/2, 2, 2]")


# -- model memory, weights, LoRA -------------------------------------------------------------------

def load_for_training(patcher):
    """Load a ModelPatcher fully onto its device with patches applied (contact point: load_models_gpu)."""
    contact = "model_management.load_models_gpu(force_full_load=)"
    load = _attribute(_module("comfy.model_management", contact), "load_models_gpu", contact)
    _parameters(load, ("models", "force_full_load"), contact)
    load([patcher], force_full_load=True)


def alias_inference_tensors(module):
    """Nodes run under ``torch.inference_mode``, so the weights a loader node created are inference
    tensors, which autograd refuses to save for backward. Swap each for a normal tensor sharing the same
    memory (no copy) by writing the module's ``_parameters`` / ``_buffers`` (contact point: module tensor
    slots); returns what ``restore_tensors`` needs to put the originals back."""
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


def patched_weight_originals(patcher):
    """``{weight key: original tensor}`` for weights a ModelPatcher currently has patched in place (its
    ``backup``; contact point: ModelPatcher.backup). Empty when nothing is patched."""
    backup = getattr(patcher, "backup", None) if patcher is not None else None
    if not backup:
        return {}
    if not isinstance(backup, dict):
        raise missing("ModelPatcher.backup", f"backup is a {type(backup).__name__}, not a dict")
    originals = {}
    for key, entry in backup.items():
        weight = getattr(entry, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise missing("ModelPatcher.backup", f"backup[{key!r}] has no .weight tensor")
        originals[key] = weight
    return originals


def weight_patches(patcher):
    """``{weight key: [patch entries]}`` a ModelPatcher holds (LoRAs and other weight patches; contact point:
    ModelPatcher.patches). Empty for anything without patches."""
    patches = getattr(patcher, "patches", None) if patcher is not None else None
    if patches is None:
        return {}
    if not isinstance(patches, dict):
        raise missing("ModelPatcher.patches", f"patches is a {type(patches).__name__}, not a dict")
    return patches


def apply_lora(model, state_dict, strength=1.0):
    """A clone of ``model`` with a ComfyUI-form LoRA state dict applied the stock way (what
    LoraLoaderModelOnly does; contact point: sd.load_lora_for_models)."""
    contact = "sd.load_lora_for_models"
    load = _attribute(_module("comfy.sd", contact), "load_lora_for_models", contact)
    patched, _ = load(model, None, state_dict, strength, 0)
    return patched


def lora_key_map(model):
    """ComfyUI's LoRA key map (LoRA module name -> weight key or (weight key, slice)) of a ModelPatcher or
    BaseModel (contact point: lora.model_lora_keys_unet)."""
    contact = "lora.model_lora_keys_unet"
    keys_unet = _attribute(_module("comfy.lora", contact), "model_lora_keys_unet", contact)
    return keys_unet(getattr(model, "model", model), {})


# The key forms of ComfyUI's LoRA loader: a module's weights are taken when the form's first key exists;
# the other keys of the form come with it. Per-module extras are taken whenever the module name matches.
LORA_FORMS = {
    "lora": (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", ".reshape_weight"),
    "diffusers": ("_lora.up.weight", "_lora.down.weight", ".reshape_weight"),
    "diffusers2": (".lora_B.weight", ".lora_A.weight", ".reshape_weight"),
    "diffusers3": (".lora.up.weight", ".lora.down.weight", ".reshape_weight"),
    "mochi": (".lora_B", ".lora_A", ".reshape_weight"),
    "transformers": (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", ".reshape_weight"),
    "peft_default": (".lora_B.default.weight", ".lora_A.default.weight", ".reshape_weight"),
    "loha": (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2"),
    "lokr_w1": (".lokr_w1", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2"),
    "lokr_w1_ab": (".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2"),
    "glora": (".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight"),
    "oft": (".oft_blocks", ".rescale"),
}
LORA_EXTRAS = (".alpha", ".dora_scale", ".w_norm", ".b_norm", ".diff", ".diff_b", ".set_weight")


@functools.lru_cache(maxsize=None)
def lora_forms():
    """The forms of ``LORA_FORMS`` this ComfyUI's loader takes, found by loading a probe of each
    (contact point: lora.load_lora key forms)."""
    contact = "lora.load_lora key forms"
    load = _attribute(_module("comfy.lora", contact), "load_lora", contact)
    _parameters(load, ("lora", "to_load", "log_missing"), contact)
    taken = {}
    for name, suffixes in LORA_FORMS.items():
        probe = {"probe" + s: torch.ones(2, 2) for s in suffixes if s != ".reshape_weight"}
        if name == "oft":
            probe = {"probe.oft_blocks": torch.zeros(1, 2, 2)}
        try:
            patches = load(probe, {"probe": "probe.weight"}, log_missing=False)
        except Exception:  # a form the loader recognises but cannot build from a probe still counts
            patches = {"probe.weight": None}
        if "probe.weight" in patches:
            taken[name] = suffixes
    if "lora" not in taken:
        raise missing(contact, "the loader takes no lora_up/lora_down pair")
    return taken


def lora_unmatched_keys(state_dict, key_map):
    """The keys of a LoRA state dict that ComfyUI's loader would not take for a model with this key map,
    in file order: computed from the key map and the loader's key forms."""
    taken = set()
    for module in key_map:
        for suffixes in lora_forms().values():
            if module + suffixes[0] in state_dict:
                taken.update(module + s for s in suffixes if module + s in state_dict)
                break
        taken.update(module + s for s in LORA_EXTRAS if module + s in state_dict)
    return [key for key in state_dict if key not in taken]


# -- sampling helpers and node plumbing ------------------------------------------------------------

def simple_sigmas(model_sampling, steps):
    """The ``simple`` schedule's sigmas (steps + 1 values; contact point: samplers.calculate_sigmas)."""
    contact = "samplers.calculate_sigmas"
    calculate = _attribute(_module("comfy.samplers", contact), "calculate_sigmas", contact)
    return calculate(model_sampling, "simple", steps)


def progress_bar(total, node_id=None):
    """ComfyUI's node progress bar (contact point: utils.ProgressBar)."""
    contact = "utils.ProgressBar(node_id=)"
    bar = _attribute(_module("comfy.utils", contact), "ProgressBar", contact)
    _parameters(bar, ("total", "node_id"), contact)
    return bar(total, node_id=node_id)


def interrupt_check():
    """The function that raises when the user pressed Cancel (contact point: model_management
    throw_exception_if_processing_interrupted)."""
    contact = "model_management.throw_exception_if_processing_interrupted"
    return _attribute(_module("comfy.model_management", contact), "throw_exception_if_processing_interrupted", contact)


def send_progress_text(text, node_id):
    """Show ``text`` on node ``node_id`` in the browser (contact point: server.PromptServer
    .send_progress_text). Cosmetic: without a server, or in a ComfyUI without the method, it does nothing."""
    if node_id is None:
        return
    try:
        from server import PromptServer
    except ImportError:  # plain use without a server: the log line is enough
        return
    send = getattr(getattr(PromptServer, "instance", None), "send_progress_text", None)
    if send is not None:
        send(text, node_id)


def vae_identity_parts(vae):
    """``(weights module, ModelPatcher or None, details)`` that identify a ``comfy.sd.VAE`` for cache keys
    (contact point: sd.VAE first_stage_model / patcher / vae_dtype). Without the module a cache key could
    not see the weights, so its absence is a MissingCapability, not a silent None."""
    module = getattr(vae, "first_stage_model", None)
    if not isinstance(module, torch.nn.Module):
        raise missing("sd.VAE.first_stage_model", f"{type(vae).__name__} has no first_stage_model module")
    return module, getattr(vae, "patcher", None), {"vae": type(vae).__qualname__,
                                                   "dtype": getattr(vae, "vae_dtype", None)}


def clip_identity_parts(clip):
    """``(text encoder module, ModelPatcher or None, details)`` that identify a ``comfy.sd.CLIP`` for cache
    keys (contact point: sd.CLIP cond_stage_model / tokenizer / layer_idx / tokenizer_options)."""
    module = getattr(clip, "cond_stage_model", None)
    if not isinstance(module, torch.nn.Module):
        raise missing("sd.CLIP.cond_stage_model", f"{type(clip).__name__} has no cond_stage_model module")
    return module, getattr(clip, "patcher", None), {
        "clip": type(module).__qualname__, "tokenizer": type(getattr(clip, "tokenizer", None)).__qualname__,
        "layer_idx": getattr(clip, "layer_idx", None), "tokenizer_options": getattr(clip, "tokenizer_options", {})}


def regular_cond_class():
    """``comfy.conds.CONDRegular``: the base of per-conditioning data that reaches the diffusion model as a
    keyword argument (contact point: conds.CONDRegular)."""
    contact = "conds.CONDRegular (model_conds)"
    cls = _attribute(_module("comfy.conds", contact), "CONDRegular", contact)
    for name in ("can_concat", "concat", "process_cond"):
        _attribute(cls, name, contact)
    return cls


# -- toy world: building models and sampling the stock way ----------------------------------------

def supported_model_config(name):
    """A model config class of ``comfy.supported_models`` (``Flux``, ``QwenImage``; contact point:
    supported_models), used to build tiny models without a checkpoint."""
    contact = f"supported_models.{name}"
    cls = _attribute(_module("comfy.supported_models", contact), name, contact)
    for method in ("set_inference_dtype", "get_model", "latent_format"):
        _attribute(cls, method, contact)
    return cls


def wrap_in_patcher(module, kind="unet", load_device=None):
    """A ``ModelPatcher`` around ``module`` on ComfyUI's devices for ``kind`` (``unet`` or ``vae``;
    contact point: model_patcher.ModelPatcher and model_management devices)."""
    contact = "model_patcher.ModelPatcher"
    patcher_cls = _attribute(_module("comfy.model_patcher", contact), "ModelPatcher", contact)
    management = _module("comfy.model_management", contact)
    offload = _attribute(management, f"{kind}_offload_device", contact)()
    if load_device is None:
        load_device = _attribute(management, "get_torch_device", contact)()
    return patcher_cls(module, load_device=load_device, offload_device=offload)


def intermediate_device():
    """Where text encoders hand their outputs (contact point: model_management.intermediate_device)."""
    contact = "model_management.intermediate_device"
    return _attribute(_module("comfy.model_management", contact), "intermediate_device", contact)()


def prompt_weight_segments(text):
    """``[(text, weight)]`` of a prompt with ComfyUI's ``(word:1.2)`` emphasis syntax, escapes removed
    (contact point: sd1_clip prompt-weight parsing)."""
    contact = "sd1_clip.token_weights"
    sd1_clip = _module("comfy.sd1_clip", contact)
    weights, escape, unescape = (_attribute(sd1_clip, n, contact)
                                 for n in ("token_weights", "escape_important", "unescape_important"))
    return [(unescape(segment), weight) for segment, weight in weights(escape(text), 1.0)]


def build_clip(tokenizer_cls, encoder_cls, params):
    """A stock ``comfy.sd.CLIP`` around a tokenizer and text-encoder class (contact point: sd.CLIP with a
    ClipTarget)."""
    contact = "sd.CLIP(target=ClipTarget)"
    target = _attribute(_module("comfy.supported_models_base", contact), "ClipTarget", contact)(tokenizer_cls, encoder_cls)
    target.params = dict(params)
    return _attribute(_module("comfy.sd", contact), "CLIP", contact)(target=target)


def vae_class():
    """``comfy.sd.VAE`` (the toy VAE subclasses it; contact point: sd.VAE)."""
    contact = "sd.VAE"
    cls = _attribute(_module("comfy.sd", contact), "VAE", contact)
    for method in ("encode", "decode"):
        _attribute(cls, method, contact)
    return cls


def init_pixel_space_vae(vae, dtype):
    """Run ``comfy.sd.VAE.__init__`` on ``vae`` (an instance of a subclass) through its pixel-space entry
    point, which sets device, dtypes, output device and patcher the stock way (contact point: sd.VAE
    pixel_space_vae; ComfyUI 0.3.52 has no such entry point)."""
    contact = "sd.VAE pixel-space entry point (pixel_space_vae)"
    vae_class().__init__(vae, sd={"pixel_space_vae": torch.tensor(1.0)}, dtype=dtype)
    for name in ("device", "output_device", "vae_dtype"):
        if not hasattr(vae, name):
            raise missing(contact, f"the VAE built from a pixel_space_vae state dict has no {name}")


VAE_FIRST_STAGE_ATTRIBUTES = ("first_stage_model", "patcher", "downscale_ratio", "upscale_ratio", "latent_channels",
                              "latent_dim", "memory_used_encode", "memory_used_decode")


def install_vae_first_stage(vae, module, ratio, latent_channels, latent_dim, bytes_per_pixel=64):
    """Make ``module`` (encode/decode) the first stage of a VAE initialised by ``init_pixel_space_vae``:
    its patcher, scale ratio, latent shape and memory estimates (contact point: sd.VAE attributes that
    encode/decode read; each must exist on the stock VAE, so a renamed one is named, not ignored)."""
    contact = "sd.VAE first-stage attributes"
    absent = [name for name in VAE_FIRST_STAGE_ATTRIBUTES if not hasattr(vae, name)]
    if absent:
        raise missing(contact, f"the stock VAE has no {', '.join(absent)}")
    vae.first_stage_model = module
    vae.patcher = wrap_in_patcher(module, "vae", load_device=vae.device)
    vae.downscale_ratio = vae.upscale_ratio = ratio
    vae.latent_channels = latent_channels
    vae.latent_dim = latent_dim
    vae.not_video = True  # a batch of images stays a batch (5-D latents get a time axis of 1)
    vae.memory_used_encode = lambda shape, dtype: bytes_per_pixel * shape[-2] * shape[-1]
    vae.memory_used_decode = lambda shape, dtype: bytes_per_pixel * shape[-2] * shape[-1] * ratio * ratio
    vae.size = None


def _comfy_nodes(contact):
    """ComfyUI's own ``nodes`` module (the V1 built-in nodes). Inside the server it is loaded; elsewhere
    it is loaded from beside ``folder_paths``, because a bare ``import nodes`` can find this package's
    ``nodes/`` folder first when the repository folder is on ``sys.path``."""
    module = sys.modules.get("nodes")
    if module is not None and hasattr(module, "NODE_CLASS_MAPPINGS"):
        return module
    root = os.path.dirname(_attribute(_module("folder_paths", contact), "__file__", contact))
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


def encode_prompt(clip, text):
    """CONDITIONING of a prompt, the way the stock CLIP Text Encode node makes it (contact point: the
    V1 node class nodes.CLIPTextEncode)."""
    contact = "nodes.CLIPTextEncode.encode"
    node = _attribute(_comfy_nodes(contact), "CLIPTextEncode", contact)
    return _attribute(node(), "encode", contact)(clip, text)[0]


def empty_latent(model, width, height, batch=1, downscale_ratio=8):
    """An empty latent for ``model`` (stock EmptyLatentImage, channels fixed for the model the way
    KSampler does; contact point: nodes.EmptyLatentImage, sample.fix_empty_latent_channels). The node
    assumes an 8x VAE; for another ``downscale_ratio`` (toy VAEs) the same zeros are made at that ratio."""
    if downscale_ratio == 8:
        contact = "nodes.EmptyLatentImage.generate"
        node = _attribute(_comfy_nodes(contact), "EmptyLatentImage", contact)
        latent = _attribute(node(), "generate", contact)(width, height, batch)[0]["samples"]
    else:
        latent = torch.zeros([batch, 4, height // downscale_ratio, width // downscale_ratio])
    fix = _attribute(_module("comfy.sample", "sample.fix_empty_latent_channels"), "fix_empty_latent_channels",
                     "sample.fix_empty_latent_channels")
    return fix(model, latent)


def sample_latent(model, latent, seed, steps, cfg, sampler_name, scheduler, positive, negative):
    """What KSampler runs: noise from ``seed`` and ``comfy.sample.sample`` (contact point: sample.sample)."""
    contact = "sample.prepare_noise / sample.sample"
    sample = _module("comfy.sample", contact)
    noise = _attribute(sample, "prepare_noise", contact)(latent, seed)
    return _attribute(sample, "sample", contact)(model, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                                                 latent, denoise=1.0, disable_pbar=True, seed=seed)


# -- the start-up check ----------------------------------------------------------------------------

def _check_model_classes():
    for name in MODEL_CLASSES:
        model_class(name)


def _check_forward_arguments():
    for name in ("Flux diffusion model", "QwenImage diffusion model"):
        _forward_parameters(model_class(name))


def _check_flux_blocks():
    layers = _module("comfy.ldm.flux.layers", "FLUX blocks")
    for cls in ("DoubleStreamBlock", "SingleStreamBlock"):
        _parameters(_attribute(layers, cls, "FLUX blocks").forward, ("pe", "attn_mask", "transformer_options"),
                    f"FLUX {cls}.forward(transformer_options=)")


def _check_qwen_block():
    module = _module("comfy.ldm.qwen_image.model", "Qwen-Image block")
    _qwen_block_parameters(_attribute(module, "QwenImageTransformerBlock", "Qwen-Image block"))


# contact point -> check (raises MissingCapability). Runtime-only contact points (pe layout, block
# replacement arguments, ModelPatcher.backup) are checked where they are used and in the contract tests.
CONTACTS = {
    "model classes": _check_model_classes,
    "diffusion model forward arguments": _check_forward_arguments,
    "DIFFUSION_MODEL wrapper": diffusion_model_wrapper_type,
    "attention override": check_attention_override,
    "FLUX attention function": _flux_attention_function,
    "FLUX blocks": _check_flux_blocks,
    "Qwen-Image block": _check_qwen_block,
    "conds.CONDRegular": regular_cond_class,
    "LoRA key forms": lora_forms,
    "load_models_gpu": lambda: _parameters(_attribute(_module("comfy.model_management", "load_models_gpu"),
                                                      "load_models_gpu", "load_models_gpu"),
                                           ("models", "force_full_load"), "load_models_gpu"),
}


def missing_capabilities():
    """``[MissingCapability]`` for every contact point whose check fails (empty: all present)."""
    problems = []
    for check in CONTACTS.values():
        try:
            check()
        except MissingCapability as error:
            problems.append(error)
    return problems


def startup_report(log=logging.getLogger("comfyui_eligen")):
    """Log one line about this ComfyUI: a refusal naming what is missing, a notice for a version newer
    than the newest tested one, nothing when it is a tested version. Returns the problems found."""
    problems = missing_capabilities()
    version = comfyui_version()
    if problems:
        names = "; ".join(getattr(p, "contact", str(p)) for p in problems)
        log.error("EliGen: ComfyUI %s is not supported (tested: %s); missing: %s. EliGen nodes will fail "
                  "with this message.", version, tested_range_text(), names)
        return problems
    newest = version_tuple(TESTED_VERSIONS[-1])
    oldest = version_tuple(TESTED_VERSIONS[0])
    current = version_tuple(version)
    if current is None or current > newest:
        log.warning("EliGen: ComfyUI %s is newer than the newest tested version %s; every capability EliGen "
                    "uses checks out, so it runs.", version, TESTED_VERSIONS[-1])
    elif current < oldest:
        log.warning("EliGen: ComfyUI %s is older than the oldest tested version %s; every capability EliGen "
                    "uses checks out, so it runs.", version, TESTED_VERSIONS[0])
    return problems


def require_all():
    """Raise the first start-up problem (for nodes: each affected node fails with the start-up message)."""
    problems = missing_capabilities()
    if len(problems) == 1:
        raise problems[0]
    if problems:
        first = problems[0]
        others = ", ".join(p.contact for p in problems[1:])
        raise MissingCapability(f"{first} (also missing: {others})")

# --- attention calls (issue 10) ---
# ComfyUI's attention functions (comfy.ldm.modules.attention.attention_*, ComfyUI 0.3.75) and the
# ``optimized_attention_override`` that wraps them take
#   (q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs)
# with q/k/v ``[B, S, H*D]``, or ``[B, H, S, D]`` when skip_reshape; the output is ``[B, S, H*D]``, or
# ``[B, H, S, D]`` when skip_output_reshape.
ATTENTION_PARAMETERS = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")


ATTENTION_CALL = "attention call arguments (q, k, v, heads, mask, skip_reshape, skip_output_reshape)"


def attention_call_arguments(args, kwargs):
    """All arguments of one attention call by name (keyword arguments ComfyUI adds are kept)."""
    if len(args) > len(ATTENTION_PARAMETERS):
        raise missing(ATTENTION_CALL, f"{len(args)} positional arguments; expected at most {len(ATTENTION_PARAMETERS)}")
    named = dict(zip(ATTENTION_PARAMETERS, args))
    for name, value in kwargs.items():
        if name in named:
            raise missing(ATTENTION_CALL, f"{name!r} passed both by position and by name")
        named[name] = value
    absent = [name for name in ATTENTION_PARAMETERS[:4] if name not in named]
    if absent:
        raise missing(ATTENTION_CALL, f"a call without {', '.join(absent)}")
    expected = 4 if named.get("skip_reshape", False) else 3
    if named["q"].ndim != expected:
        raise missing(ATTENTION_CALL, f"q has {named['q'].ndim} dimensions with skip_reshape="
                                      f"{named.get('skip_reshape', False)}; expected {expected}")
    return named


@functools.lru_cache(maxsize=None)
def check_attention_layouts():
    """ComfyUI's chosen attention function takes ``[B, H, S, D]`` with skip_reshape and returns it with
    skip_output_reshape (the entity attention methods call it on pieces in that layout). Checked on tiny
    tensors (contact point: ATTENTION_CALL)."""
    attention = _module("comfy.ldm.modules.attention", ATTENTION_CALL)
    function = _attribute(attention, "optimized_attention", ATTENTION_CALL)
    q = torch.zeros(1, 2, 3, 4)
    try:
        heads_layout = function(q, q, q, 2, skip_reshape=True, skip_output_reshape=True)
        joined = function(q, q, q, 2, skip_reshape=True, skip_output_reshape=False)
    except TypeError as error:
        raise missing(ATTENTION_CALL, f"the attention function does not take skip_reshape/skip_output_reshape "
                                      f"({error})") from None
    if tuple(heads_layout.shape) != (1, 2, 3, 4) or tuple(joined.shape) != (1, 3, 8):
        raise missing(ATTENTION_CALL, f"outputs {tuple(heads_layout.shape)} and {tuple(joined.shape)} for "
                                      f"[1, 2, 3, 4] inputs; expected (1, 2, 3, 4) and (1, 3, 8)")
    return True


CONTACTS[ATTENTION_CALL] = check_attention_layouts


def attention_sequence_length(named):
    """The query sequence length of an attention call (``attention_call_arguments`` form)."""
    q = named["q"]
    return q.shape[2] if named.get("skip_reshape", False) else q.shape[1]


def is_quantized_attention(func):
    """Whether ``func`` (the attention function an override receives) is ComfyUI's SageAttention one,
    which quantizes q and k (comfy.ldm.modules.attention.attention_sage, wrapped by ``wrap_attn``)."""
    import comfy.ldm.modules.attention as attention

    sage = getattr(attention, "attention_sage", None)
    if sage is None:
        return False
    return func is sage or func is getattr(sage, "__wrapped__", None)

# --- memory: encoders off the device, block-swap loading (issue 11) ---

MEMORY_MANAGEMENT = "model management (free_memory, current_loaded_models, LoadedModel.model_unload)"
PATCH_ON_OFFLOAD = "ModelPatcher.patch_model / unpatch_model (block-swap loading)"


def _model_management():
    """comfy.model_management with what unloading relies on, checked (contact point: MEMORY_MANAGEMENT)."""
    mm = _module("comfy.model_management", MEMORY_MANAGEMENT)
    _parameters(_attribute(mm, "free_memory", MEMORY_MANAGEMENT), ("memory_required", "device", "keep_loaded"),
                MEMORY_MANAGEMENT)
    if not isinstance(getattr(mm, "current_loaded_models", None), list):
        raise missing(MEMORY_MANAGEMENT, "comfy.model_management.current_loaded_models is not a list")
    _attribute(_attribute(mm, "LoadedModel", MEMORY_MANAGEMENT), "model_unload", MEMORY_MANAGEMENT)
    return mm


def _check_patch_on_offload():
    patcher = _attribute(_module("comfy.model_patcher", PATCH_ON_OFFLOAD), "ModelPatcher", PATCH_ON_OFFLOAD)
    _parameters(_attribute(patcher, "patch_model", PATCH_ON_OFFLOAD),
                ("device_to", "lowvram_model_memory", "load_weights"), PATCH_ON_OFFLOAD)
    _parameters(_attribute(patcher, "unpatch_model", PATCH_ON_OFFLOAD), ("device_to", "unpatch_weights"),
                PATCH_ON_OFFLOAD)
    return patcher


CONTACTS[MEMORY_MANAGEMENT] = _model_management
CONTACTS[PATCH_ON_OFFLOAD] = _check_patch_on_offload


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


def _as_device(device):
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# --- headless loading (issue 12) ---
# The headless trainer (scripts/train.py) loads models as the stock loader nodes do, through ComfyUI's
# own loading functions, without a server.

import os  # noqa: E402  (this section's own import, kept with it)

WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")  # UNETLoader's weight_dtype choices


def model_file_path(folder, name):
    """Absolute path of a model file as the stock loaders list it (contact point: folder_paths). Only
    safetensors files are accepted: the headless trainer never unpickles."""
    contact = "folder_paths.get_full_path"
    folder_paths = _module("folder_paths", contact)
    if not str(name).endswith(".safetensors"):
        raise ValueError(f"{folder} file {name!r}: only .safetensors files are loaded")
    path = _attribute(folder_paths, "get_full_path", contact)(folder, name)
    if path is None:
        places = ", ".join(folder_paths.get_folder_paths(folder)) or "no folder"
        raise ValueError(f"{folder} file {name!r} not found (looked in {places})")
    return path


def add_models_dir(models_dir):
    """Look for model files in ``models_dir/<kind>`` too, ComfyUI's models layout (contact point:
    folder_paths.add_model_folder_path)."""
    contact = "folder_paths.add_model_folder_path"
    add = _attribute(_module("folder_paths", contact), "add_model_folder_path", contact)
    for kind in ("diffusion_models", "unet", "checkpoints", "text_encoders", "clip", "vae", "loras", "embeddings"):
        add(kind, os.path.join(models_dir, kind))


def load_diffusion_model_file(name, weight_dtype="default"):
    """UNETLoader: a diffusion model file -> ModelPatcher (contact point: sd.load_diffusion_model)."""
    contact = "sd.load_diffusion_model(model_options=)"
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype {weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    options = {}
    if weight_dtype.startswith("fp8_e4m3fn"):
        options["dtype"] = torch.float8_e4m3fn
        if weight_dtype.endswith("_fast"):
            options["fp8_optimizations"] = True
    elif weight_dtype == "fp8_e5m2":
        options["dtype"] = torch.float8_e5m2
    load = _attribute(_module("comfy.sd", contact), "load_diffusion_model", contact)
    _parameters(load, ("model_options",), contact)
    return load(model_file_path("diffusion_models", name), model_options=options)


def load_text_encoder_files(names, clip_type, device="default"):
    """CLIPLoader / DualCLIPLoader: text encoder files -> CLIP (contact point: sd.load_clip, sd.CLIPType)."""
    contact = "sd.load_clip(ckpt_paths=, clip_type=)"
    sd = _module("comfy.sd", contact)
    types = _attribute(sd, "CLIPType", contact)
    if not hasattr(types, str(clip_type).upper()):
        raise ValueError(f"text encoder type {clip_type!r} is not known to this ComfyUI")
    options = {}
    if device == "cpu":
        options["load_device"] = options["offload_device"] = torch.device("cpu")
    load = _attribute(sd, "load_clip", contact)
    _parameters(load, ("ckpt_paths", "embedding_directory", "clip_type", "model_options"), contact)
    folder_paths = _module("folder_paths", contact)
    return load(ckpt_paths=[model_file_path("text_encoders", n) for n in names],
                embedding_directory=folder_paths.get_folder_paths("embeddings"),
                clip_type=getattr(types, str(clip_type).upper()), model_options=options)


def load_vae_file(name):
    """VAELoader (files only): a VAE file -> VAE (contact point: utils.load_torch_file, sd.VAE)."""
    contact = "sd.VAE(sd=)"
    read = _attribute(_module("comfy.utils", contact), "load_torch_file", contact)
    vae = _attribute(_module("comfy.sd", contact), "VAE", contact)(
        sd=read(model_file_path("vae", name), safe_load=True))
    if hasattr(vae, "throw_exception_if_invalid"):
        vae.throw_exception_if_invalid()
    return vae


def load_checkpoint_file(name):
    """CheckpointLoaderSimple: one file -> (ModelPatcher, CLIP, VAE) (contact point:
    sd.load_checkpoint_guess_config)."""
    contact = "sd.load_checkpoint_guess_config"
    load = _attribute(_module("comfy.sd", contact), "load_checkpoint_guess_config", contact)
    folder_paths = _module("folder_paths", contact)
    out = load(model_file_path("checkpoints", name), output_vae=True, output_clip=True,
               embedding_directory=folder_paths.get_folder_paths("embeddings"))
    return tuple(out[:3])


def select_cuda_device(index):
    """Make ``cuda:index`` the device ComfyUI loads models to: it uses torch's current CUDA device
    (contact point: model_management.get_torch_device)."""
    contact = "model_management.get_torch_device"
    get_device = _attribute(_module("comfy.model_management", contact), "get_torch_device", contact)
    torch.cuda.set_device(index)
    device = get_device()
    if device.type == "cuda" and device.index not in (None, index):
        raise missing(contact, f"it returns {device}, not cuda:{index}, after torch.cuda.set_device({index})")
    return device


def _headless_check(module, name, arguments=()):
    def check():
        function = _attribute(_module(module, f"{module}.{name}"), name, f"{module}.{name}")
        if arguments:
            _parameters(function, arguments, f"{module}.{name}")
    return check


# Checked by tests (tests/test_run_file.py), not at start-up: only scripts/train.py needs them.
HEADLESS_CONTACTS = {
    "folder_paths.get_full_path": _headless_check("folder_paths", "get_full_path"),
    "folder_paths.add_model_folder_path": _headless_check("folder_paths", "add_model_folder_path"),
    "sd.load_diffusion_model": _headless_check("comfy.sd", "load_diffusion_model", ("model_options",)),
    "sd.load_clip": _headless_check("comfy.sd", "load_clip",
                                    ("ckpt_paths", "embedding_directory", "clip_type", "model_options")),
    "sd.CLIPType": _headless_check("comfy.sd", "CLIPType"),
    "sd.VAE": _headless_check("comfy.sd", "VAE"),
    "utils.load_torch_file": _headless_check("comfy.utils", "load_torch_file", ("safe_load",)),
    "sd.load_checkpoint_guess_config": _headless_check("comfy.sd", "load_checkpoint_guess_config",
                                                       ("output_vae", "output_clip", "embedding_directory")),
    "model_management.get_torch_device": _headless_check("comfy.model_management", "get_torch_device"),
}


# --- model and output folders (issue 9) ---
# ComfyUI's folder_paths: where inputs, outputs and LoRA files live. Nodes reach it only through here.

FOLDER_PATHS = "folder_paths"


def _folder_function(name):
    return _attribute(_module("folder_paths", FOLDER_PATHS), name, f"{FOLDER_PATHS}.{name}")


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


def _check_folder_paths():
    for name in ("get_input_directory", "get_output_directory", "get_folder_paths", "get_filename_list",
                 "get_full_path_or_raise", "get_save_image_path"):
        _folder_function(name)


CONTACTS[FOLDER_PATHS] = _check_folder_paths
