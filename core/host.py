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


# --- attention calls (issue 10) ---
# ComfyUI's attention functions (comfy.ldm.modules.attention.attention_*, ComfyUI 0.3.75) and the
# ``optimized_attention_override`` that wraps them take
#   (q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs)
# with q/k/v ``[B, S, H*D]``, or ``[B, H, S, D]`` when skip_reshape; the output is ``[B, S, H*D]``, or
# ``[B, H, S, D]`` when skip_output_reshape.
ATTENTION_PARAMETERS = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")


def attention_call_arguments(args, kwargs):
    """All arguments of one attention call by name (keyword arguments ComfyUI adds are kept)."""
    if len(args) > len(ATTENTION_PARAMETERS):
        raise MissingCapability(f"attention call with {len(args)} positional arguments; expected at most "
                                f"{len(ATTENTION_PARAMETERS)} ({', '.join(ATTENTION_PARAMETERS)})")
    named = dict(zip(ATTENTION_PARAMETERS, args))
    for name, value in kwargs.items():
        if name in named:
            raise MissingCapability(f"attention call passes {name!r} both by position and by name")
        named[name] = value
    missing = [name for name in ATTENTION_PARAMETERS[:4] if name not in named]
    if missing:
        raise MissingCapability(f"attention call without {', '.join(missing)} (expected q, k, v, heads)")
    expected = 4 if named.get("skip_reshape", False) else 3
    if named["q"].ndim != expected:
        raise MissingCapability(f"attention call with q of {named['q'].ndim} dimensions; expected {expected} "
                                f"(skip_reshape={named.get('skip_reshape', False)})")
    return named


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
