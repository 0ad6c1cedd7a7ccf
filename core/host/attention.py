"""Attention: ComfyUI's attention functions, the ``optimized_attention_override`` in transformer_options
that lets the entity rule reach every attention call, and the FLUX attention call the out-of-place
training blocks make.

ComfyUI's attention functions (comfy.ldm.modules.attention.attention_*, ComfyUI 0.3.75) and the override
that wraps them take
  (q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs)
with q/k/v ``[B, S, H*D]``, or ``[B, H, S, D]`` when skip_reshape; the output is ``[B, S, H*D]``, or
``[B, H, S, D]`` when skip_output_reshape.
"""

import functools

import torch

from . import RUNTIME, attribute, comfy_module, contact_point, keyword_parameters, missing

ATTENTION_MODULE = "comfy.ldm.modules.attention"
ATTENTION_OVERRIDE_KEY = "optimized_attention_override"
OVERRIDE = "transformer_options['optimized_attention_override']"


@contact_point("attention override key in transformer_options", RUNTIME)
def with_attention_override(transformer_options, make):
    """A copy of ``transformer_options`` whose attention override is ``make(existing override or None)``."""
    options = dict(transformer_options)
    options[ATTENTION_OVERRIDE_KEY] = make(options.get(ATTENTION_OVERRIDE_KEY))
    return options


@contact_point("attention override")
@functools.lru_cache(maxsize=None)
def check_attention_override():
    """ComfyUI's attention functions call ``transformer_options["optimized_attention_override"]`` (added
    in 0.3.6x; without it no entity mask can reach every attention call). Checked by calling the attention
    function on tiny tensors with a probe override."""
    function = attribute(comfy_module(ATTENTION_MODULE, OVERRIDE), "optimized_attention", OVERRIDE)
    calls = []

    def probe(func, *args, **kwargs):
        calls.append(("mask" in kwargs or len(args) > 4, "transformer_options" in kwargs))
        return args[0]

    q = torch.zeros(1, 2, 4)
    try:
        function(q, q, q, 1, mask=None, transformer_options={ATTENTION_OVERRIDE_KEY: probe})
    except TypeError as error:
        raise missing(OVERRIDE, f"the attention function does not take transformer_options ({error})") from None
    if not calls:
        raise missing(OVERRIDE, "the attention function ignores the override")
    if not calls[0][1]:
        raise missing(OVERRIDE, "the override is called without transformer_options")
    return True


FLUX_ATTENTION = "comfy.ldm.flux.math.attention(transformer_options=)"


@contact_point("FLUX attention function")
@functools.lru_cache(maxsize=None)
def flux_attention_function():
    """``comfy.ldm.flux.math.attention``, checked to take ``transformer_options``."""
    function = attribute(comfy_module("comfy.ldm.flux.math", FLUX_ATTENTION), "attention", FLUX_ATTENTION)
    keyword_parameters(function, ("q", "k", "v", "pe", "mask", "transformer_options"), FLUX_ATTENTION)
    return function


def flux_attention(q, k, v, pe, mask, transformer_options):
    """FLUX attention with ``transformer_options`` (so the entity override applies)."""
    return flux_attention_function()(q, k, v, pe=pe, mask=mask, transformer_options=transformer_options)


ATTENTION_PARAMETERS = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")
ATTENTION_CALL = "attention call arguments (q, k, v, heads, mask, skip_reshape, skip_output_reshape)"


@contact_point(ATTENTION_CALL, RUNTIME)
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


def attention_sequence_length(named):
    """The query sequence length of an attention call (``attention_call_arguments`` form)."""
    q = named["q"]
    return q.shape[2] if named.get("skip_reshape", False) else q.shape[1]


@contact_point(ATTENTION_CALL)
@functools.lru_cache(maxsize=None)
def check_attention_layouts():
    """ComfyUI's chosen attention function takes ``[B, H, S, D]`` with skip_reshape and returns it with
    skip_output_reshape (the entity attention methods call it on pieces in that layout). Checked on tiny
    tensors."""
    function = attribute(comfy_module(ATTENTION_MODULE, ATTENTION_CALL), "optimized_attention", ATTENTION_CALL)
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


@contact_point("attention.attention_sage", RUNTIME)
def is_quantized_attention(func):
    """Whether ``func`` (the attention function an override receives) is ComfyUI's SageAttention one,
    which quantizes q and k (attention_sage, wrapped by ``wrap_attn``). A ComfyUI without it has none."""
    sage = getattr(comfy_module(ATTENTION_MODULE, "attention.attention_sage"), "attention_sage", None)
    if sage is None:
        return False
    return func is sage or func is getattr(sage, "__wrapped__", None)
