"""Text encoders and VAEs (``comfy.sd.CLIP`` / ``comfy.sd.VAE``): what identifies them for cache keys,
ComfyUI's prompt-weight syntax, and building the toy world's CLIP and VAE from the stock classes."""

import torch

from . import RUNTIME, attribute, comfy_module, contact_point, memory, missing, module_attribute


@contact_point("sd.CLIP.cond_stage_model", RUNTIME)
def text_encoder_module(clip):
    """The text encoder module a ``comfy.sd.CLIP`` runs."""
    return module_attribute(clip, "cond_stage_model", "sd.CLIP.cond_stage_model")


@contact_point("sd.CLIP identity (patcher, tokenizer, layer_idx, tokenizer_options)", RUNTIME)
def clip_identity_parts(clip):
    """``(text encoder module, ModelPatcher or None, details)`` that identify a ``comfy.sd.CLIP`` for cache
    keys."""
    module = text_encoder_module(clip)
    return module, getattr(clip, "patcher", None), {
        "clip": type(module).__qualname__, "tokenizer": type(getattr(clip, "tokenizer", None)).__qualname__,
        "layer_idx": getattr(clip, "layer_idx", None), "tokenizer_options": getattr(clip, "tokenizer_options", {})}


@contact_point("sd.VAE.first_stage_model", RUNTIME)
def vae_identity_parts(vae):
    """``(weights module, ModelPatcher or None, details)`` that identify a ``comfy.sd.VAE`` for cache keys
    (first_stage_model / patcher / vae_dtype). Without the module a cache key could not see the weights,
    so its absence is a MissingCapability, not a silent None."""
    module = module_attribute(vae, "first_stage_model", "sd.VAE.first_stage_model")
    return module, getattr(vae, "patcher", None), {"vae": type(vae).__qualname__,
                                                   "dtype": getattr(vae, "vae_dtype", None)}


@contact_point("sd.VAE.downscale_ratio", RUNTIME)
def vae_downscale_ratio(vae):
    """Image pixels per latent cell along each side."""
    ratio = getattr(vae, "downscale_ratio", None)
    if not isinstance(ratio, int):
        raise missing("sd.VAE.downscale_ratio", f"{type(vae).__name__} has no integer downscale_ratio ({ratio!r})")
    return ratio


@contact_point("sd1_clip.token_weights", RUNTIME)
def prompt_weight_segments(text):
    """``[(text, weight)]`` of a prompt with ComfyUI's ``(word:1.2)`` emphasis syntax, escapes removed."""
    contact = "sd1_clip.token_weights"
    sd1_clip = comfy_module("comfy.sd1_clip", contact)
    weights, escape, unescape = (attribute(sd1_clip, n, contact)
                                 for n in ("token_weights", "escape_important", "unescape_important"))
    return [(unescape(segment), weight) for segment, weight in weights(escape(text), 1.0)]


@contact_point("sd.CLIP(target=ClipTarget)", RUNTIME)
def build_clip(tokenizer_cls, encoder_cls, params):
    """A stock ``comfy.sd.CLIP`` around a tokenizer and text-encoder class."""
    contact = "sd.CLIP(target=ClipTarget)"
    target = attribute(comfy_module("comfy.supported_models_base", contact), "ClipTarget", contact)(tokenizer_cls, encoder_cls)
    target.params = dict(params)
    return attribute(comfy_module("comfy.sd", contact), "CLIP", contact)(target=target)


@contact_point("sd.VAE", RUNTIME)
def vae_class():
    """``comfy.sd.VAE`` (the toy VAE subclasses it)."""
    contact = "sd.VAE"
    cls = attribute(comfy_module("comfy.sd", contact), "VAE", contact)
    for method in ("encode", "decode"):
        attribute(cls, method, contact)
    return cls


PIXEL_SPACE_VAE = "sd.VAE pixel-space entry point (pixel_space_vae)"


@contact_point(PIXEL_SPACE_VAE, RUNTIME)
def init_pixel_space_vae(vae, dtype):
    """Run ``comfy.sd.VAE.__init__`` on ``vae`` (an instance of a subclass) through its pixel-space entry
    point, which sets device, dtypes, output device and patcher the stock way (ComfyUI 0.3.52 has no such
    entry point)."""
    vae_class().__init__(vae, sd={"pixel_space_vae": torch.tensor(1.0)}, dtype=dtype)
    for name in ("device", "output_device", "vae_dtype"):
        if not hasattr(vae, name):
            raise missing(PIXEL_SPACE_VAE, f"the VAE built from a pixel_space_vae state dict has no {name}")


VAE_FIRST_STAGE_ATTRIBUTES = ("first_stage_model", "patcher", "downscale_ratio", "upscale_ratio", "latent_channels",
                              "latent_dim", "memory_used_encode", "memory_used_decode")


@contact_point("sd.VAE first-stage attributes", RUNTIME)
def install_vae_first_stage(vae, module, ratio, latent_channels, latent_dim, bytes_per_pixel=64):
    """Make ``module`` (encode/decode) the first stage of a VAE initialised by ``init_pixel_space_vae``:
    its patcher, scale ratio, latent shape and memory estimates (the sd.VAE attributes that encode/decode
    read; each must exist on the stock VAE, so a renamed one is named, not ignored)."""
    absent = [name for name in VAE_FIRST_STAGE_ATTRIBUTES if not hasattr(vae, name)]
    if absent:
        raise missing("sd.VAE first-stage attributes", f"the stock VAE has no {', '.join(absent)}")
    vae.first_stage_model = module
    vae.patcher = memory.wrap_in_patcher(module, "vae", load_device=vae.device)
    vae.downscale_ratio = vae.upscale_ratio = ratio
    vae.latent_channels = latent_channels
    vae.latent_dim = latent_dim
    vae.not_video = True  # a batch of images stays a batch (5-D latents get a time axis of 1)
    vae.memory_used_encode = lambda shape, dtype: bytes_per_pixel * shape[-2] * shape[-1]
    vae.memory_used_decode = lambda shape, dtype: bytes_per_pixel * shape[-2] * shape[-1] * ratio * ratio
    vae.size = None
