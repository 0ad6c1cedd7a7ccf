"""LoRA file formats: detect, convert to ComfyUI's form, export to the reference's form, save, load.

Three files meet here:
- ComfyUI form (what we save): ``diffusion_model.<module>.lora_up.weight`` / ``.lora_down.weight`` /
  ``.alpha``. The stock ``LoraLoaderModelOnly`` takes it for every model.
- Released EliGen adapters: FLUX.1 in kohya form (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``),
  Qwen-Image in peft form (``transformer_blocks.0.attn.to_q.lora_A.default.weight``, no alpha = scale 1).
  The stock loader takes both.
- DiffSynth-Studio's internal FLUX names (``blocks.0.attn.a_to_qkv.lora_A.default.weight``), which the stock
  loader drops. ``DIFFSYNTH_FLUX_RENAMES`` maps them to ComfyUI module names (same fused layouts).

Which keys the stock loader takes comes from ComfyUI itself (core/host/weights.py: the model's LoRA key map and the
loader's key forms, probed from the loader): we only rename what it would drop.
"""

import json
import math
import os
import re

import torch

from . import host
from .files import atomic_path

COMFY_PREFIX = "diffusion_model."
KOHYA_PREFIX = "lora_unet_"
# Reference formats we export, by the name an adapter gives in ``adapter.lora_reference_format``.
REFERENCE_FORMATS = ("kohya", "peft")

# DiffSynth-Studio's internal FLUX module names -> ComfyUI's (eligen.md); weights share one layout.
DIFFSYNTH_FLUX_RENAMES = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"^blocks\.(\d+)\.attn\.a_to_qkv$", r"double_blocks.\1.img_attn.qkv"),
        (r"^blocks\.(\d+)\.attn\.b_to_qkv$", r"double_blocks.\1.txt_attn.qkv"),
        (r"^blocks\.(\d+)\.attn\.a_to_out$", r"double_blocks.\1.img_attn.proj"),
        (r"^blocks\.(\d+)\.attn\.b_to_out$", r"double_blocks.\1.txt_attn.proj"),
        (r"^blocks\.(\d+)\.ff_a\.([02])$", r"double_blocks.\1.img_mlp.\2"),
        (r"^blocks\.(\d+)\.ff_b\.([02])$", r"double_blocks.\1.txt_mlp.\2"),
        (r"^blocks\.(\d+)\.norm1_a\.linear$", r"double_blocks.\1.img_mod.lin"),
        (r"^blocks\.(\d+)\.norm1_b\.linear$", r"double_blocks.\1.txt_mod.lin"),
        (r"^single_blocks\.(\d+)\.to_qkv_mlp$", r"single_blocks.\1.linear1"),
        (r"^single_blocks\.(\d+)\.proj_out$", r"single_blocks.\1.linear2"),
        (r"^single_blocks\.(\d+)\.norm\.linear$", r"single_blocks.\1.modulation.lin"),
    )
)

# How LoRA tensors are suffixed in the formats we convert: (regex on the key's end, role). "up" is the
# [out, rank] matrix (kohya lora_up = peft lora_B), "down" the [rank, in] one; the other roles are per-module
# extras the stock loader reads (DoRA scale, LoCon mid, full diffs), which must follow their module's name.
_ROLE_SUFFIXES = tuple(
    (re.compile(pattern), role)
    for pattern, role in (
        (r"\.lora_up\.weight$", "up"),
        (r"\.lora_down\.weight$", "down"),
        (r"\.lora_B(\.[A-Za-z0-9_]+)?\.weight$", "up"),
        (r"\.lora_A(\.[A-Za-z0-9_]+)?\.weight$", "down"),
        (r"\.lora\.up\.weight$", "up"),
        (r"\.lora\.down\.weight$", "down"),
        (r"\.alpha$", "alpha"),
        (r"\.dora_scale$", "dora_scale"),
        (r"\.lora_mid\.weight$", "mid"),
        (r"\.diff$", "diff"),
        (r"\.diff_b$", "diff_b"),
    )
)
_COMFY_SUFFIX = {"up": ".lora_up.weight", "down": ".lora_down.weight", "alpha": ".alpha",
                 "dora_scale": ".dora_scale", "mid": ".lora_mid.weight", "diff": ".diff", "diff_b": ".diff_b"}
# Wrappers some trainers put around module paths (peft's own model wrapper).
_WRAPPER_PREFIXES = ("base_model.model.",)


def split_lora_key(key):
    """``"blocks.0.attn.a_to_qkv.lora_A.default.weight"`` -> ``("blocks.0.attn.a_to_qkv", "down")``, or None."""
    for pattern, role in _ROLE_SUFFIXES:
        match = pattern.search(key)
        if match:
            return key[: match.start()], role
    return None


def _key_format(key):
    if key.startswith(KOHYA_PREFIX):
        return "kohya"
    if key.startswith(COMFY_PREFIX):
        return "comfy"
    split = split_lora_key(key)
    if split is None:
        return "unknown"
    module, _ = split
    if any(pattern.match(module) for pattern, _ in DIFFSYNTH_FLUX_RENAMES):
        return "diffsynth_flux"
    if re.search(r"\.lora_[AB](\.[A-Za-z0-9_]+)?\.weight$", key):
        return "peft"
    return "unknown"


def detect_format(state_dict):
    """Name the key format of a LoRA state dict: ``comfy``, ``kohya``, ``peft``, ``diffsynth_flux``,
    ``unknown`` (no key fits a known form), or ``mixed`` (several forms in one file)."""
    if not state_dict:
        raise ValueError("the LoRA file holds no tensors")
    formats = {_key_format(key) for key in state_dict}
    if len(formats) == 1:
        return formats.pop()
    return "mixed"


def stock_unmatched_keys(state_dict, key_map):
    """The keys ComfyUI's own LoRA loader would drop for a model with this key map, in file order
    (computed from the key map and the loader's key forms: ``host.weights.lora_unmatched_keys``)."""
    return host.weights.lora_unmatched_keys(state_dict, key_map)


def model_key_map(model):
    """ComfyUI's LoRA key map for a ModelPatcher or BaseModel (LoRA module name -> weight key)."""
    return host.weights.lora_key_map(model)


def _comfy_module(module, key_map, renames):
    """The ComfyUI module path (``diffusion_model.X``) a LoRA module name stands for, or None."""
    names = [module]
    for wrapper in _WRAPPER_PREFIXES:
        if module.startswith(wrapper):
            names.append(module[len(wrapper):])
    names += [pattern.sub(replacement, name) for name in list(names) for pattern, replacement in renames
              if pattern.match(name)]
    for name in names:
        for candidate in (name, COMFY_PREFIX + name):
            target = key_map.get(candidate)
            # Tuple targets are slices of a fused weight: those keep their own names (the stock loader
            # takes them as they are); a plain target is one whole weight we can name directly.
            if isinstance(target, str) and target.endswith(".weight"):
                return target[: -len(".weight")]
    return None


def to_comfy(state_dict, key_map, renames=DIFFSYNTH_FLUX_RENAMES, sources=None):
    """Convert a LoRA state dict to ComfyUI's form for the model whose LoRA key map is ``key_map``.

    Returns ``(converted, unmatched_keys)``. Every LoRA matrix or alpha whose module the model has becomes
    ``diffusion_model.<module>.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha`` (per-module extras such
    as ``.dora_scale`` follow the same rename); a module without an alpha gets ``alpha = rank`` (scale 1,
    what peft files without alpha mean). Other keys the stock loader takes (e.g. diffusers names that map
    onto slices of a fused qkv) are kept as they are. ``unmatched_keys`` lists, in file order, every key
    neither path can place. ``sources``, when given, is filled with converted key -> the file's key.
    """
    sources = {} if sources is None else sources
    stock_dropped = set(stock_unmatched_keys(state_dict, key_map))
    converted, unmatched = {}, []
    for key, tensor in state_dict.items():
        split = split_lora_key(key)
        module = _comfy_module(split[0], key_map, renames) if split else None
        if module is not None:
            out_key = module + _COMFY_SUFFIX[split[1]]
        elif key not in stock_dropped:
            out_key = key
        else:
            unmatched.append(key)
            continue
        if out_key in converted:
            raise ValueError(f"LoRA keys {sources[out_key]!r} and {key!r} both set {out_key!r}")
        converted[out_key] = tensor
        sources[out_key] = key
    for key in list(converted):
        if key.endswith(".lora_down.weight"):
            alpha_key = key[: -len(".lora_down.weight")] + ".alpha"
            if alpha_key not in converted:
                converted[alpha_key] = torch.tensor(float(converted[key].shape[0]))
    return converted, unmatched


def unmatched_error(unmatched, source="LoRA", limit=12):
    """A ValueError naming the keys a model has no place for."""
    shown = ", ".join(repr(key) for key in unmatched[:limit])
    more = f" and {len(unmatched) - limit} more" if len(unmatched) > limit else ""
    return ValueError(f"{source}: {len(unmatched)} key(s) match no module of this model: {shown}{more}")


def shape_problems(comfy_state_dict, model_state_dict, sources=None):
    """Keys that do not fit the model's weights, as messages naming the key (the file's name for it when
    ``sources`` maps converted keys to the file's): LoRA matrices whose product is not the weight's shape,
    and the extras the stock loader would skip with only a console warning or fail on while sampling: a
    ``.diff`` / ``.diff_b`` not of the weight's / bias's shape, a ``.dora_scale`` of neither side's size."""
    sources = sources or {}
    problems = []
    for key, tensor in comfy_state_dict.items():
        split = split_lora_key(key)
        if split is None:
            continue
        module, role = split
        name = sources.get(key, key)
        weight = model_state_dict.get(module + ".weight")
        if key.endswith(".lora_down.weight"):  # (other names are kept for the stock loader's own forms)
            up = comfy_state_dict.get(module + ".lora_up.weight")
            if up is None:
                problems.append(f"{module}.lora_down.weight has no lora_up partner")
            elif weight is not None and (up.shape[0] != weight.shape[0] or up.shape[1] != tensor.shape[0]
                                         or tensor.shape[1] != math.prod(weight.shape[1:])):
                problems.append(f"{key}: up {tuple(up.shape)} x down {tuple(tensor.shape)} does not fit the "
                                f"model weight {tuple(weight.shape)}")
        elif role in ("diff", "diff_b"):
            target = module + (".weight" if role == "diff" else ".bias")
            wanted = model_state_dict.get(target)
            if wanted is None and role == "diff_b" and weight is not None:
                problems.append(f"key {name!r}: the model's {module} has no bias for it to change")
            elif wanted is not None and tuple(tensor.shape) != tuple(wanted.shape):
                problems.append(f"key {name!r} has shape {tuple(tensor.shape)} but the model's {target} is "
                                f"{tuple(wanted.shape)} (ComfyUI would leave it out with only a console warning)")
        elif role == "dora_scale" and weight is not None and tensor.numel() not in (
                weight.shape[0], math.prod(weight.shape[1:])):
            problems.append(f"key {name!r} has {tensor.numel()} values but the model's {module}.weight "
                            f"{tuple(weight.shape)} has {weight.shape[0]} outputs and "
                            f"{math.prod(weight.shape[1:])} inputs (one scale per output or input)")
    return problems


def tensor_problems(state_dict):
    """What makes a LoRA state dict unusable before any key is mapped, one message per key: keys that are
    not text, values that are not tensors, NaN or inf values, an alpha that is not one number, LoRA
    matrices that are not 2-D (or 4-D conv) or lack their partner, and partners whose ranks differ."""
    if not isinstance(state_dict, dict):
        return [f"expected a dict of tensors, got {type(state_dict).__name__}"]
    problems, modules, mids = [], {}, {}
    for key, tensor in state_dict.items():
        if not isinstance(key, str):
            problems.append(f"key {key!r} is not text")
            continue
        if not isinstance(tensor, torch.Tensor):
            problems.append(f"key {key!r} holds a {type(tensor).__name__}, not a tensor")
            continue
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            problems.append(f"key {key!r} holds NaN or inf values")
            continue
        split = split_lora_key(key)
        if split is None:
            continue
        module, role = split
        if role == "alpha" and tensor.numel() != 1:
            problems.append(f"key {key!r}: an alpha must be one number, got shape {tuple(tensor.shape)}")
        elif role in ("up", "down"):
            if tensor.ndim not in (2, 4) or 0 in tensor.shape:
                problems.append(f"key {key!r}: a LoRA matrix must be 2-D (or 4-D), got shape {tuple(tensor.shape)}")
            else:
                modules.setdefault(module, {})[role] = (key, tensor)
        elif role == "mid":
            mids[module] = key
    for module, key in mids.items():
        # ComfyUI applies a mid tensor (LoCon's Tucker core) to every LoRA that has one: with 2-D
        # matrices it fails inside the sampler (IndexError), long after the file was loaded.
        parts = modules.get(module, {})
        if len(parts) != 2:
            problems.append(f"key {key!r}: a lora_mid tensor needs its module's lora_up and lora_down")
        elif any(tensor.ndim != 4 for _, tensor in parts.values()):
            problems.append(f"key {key!r}: a lora_mid (LoCon Tucker) tensor belongs to convolution LoRAs with "
                            f"4-D lora_up/lora_down, but this module's are 2-D; ComfyUI would load it and then "
                            f"fail while sampling (IndexError). Remove the key")
    for module, parts in modules.items():
        if len(parts) == 1:
            (role, (key, _)), = parts.items()
            problems.append(f"key {key!r} has no {'lora_down (A)' if role == 'up' else 'lora_up (B)'} partner")
        elif parts["up"][1].shape[1] != parts["down"][1].shape[0]:
            problems.append(f"keys {parts['up'][0]!r} {tuple(parts['up'][1].shape)} and {parts['down'][0]!r} "
                            f"{tuple(parts['down'][1].shape)} have different ranks")
    return problems


def to_comfy_for_model(state_dict, model, source="LoRA"):
    """``to_comfy`` for a ModelPatcher/BaseModel. Raises a ValueError naming the keys that are unusable
    (``tensor_problems``), match no module of the model, or whose shapes do not fit it."""
    problems = tensor_problems(state_dict)
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ValueError(f"{source}: {len(problems)} problem(s): " + "; ".join(problems[:8]) + more)
    if not state_dict:
        raise ValueError(f"{source}: the LoRA file holds no tensors")
    base_model = getattr(model, "model", model)
    sources = {}
    converted, unmatched = to_comfy(state_dict, model_key_map(base_model), sources=sources)
    if unmatched:
        raise unmatched_error(unmatched, source)
    problems = shape_problems(converted, base_model.state_dict(), sources)
    if problems:
        raise ValueError(f"{source}: {len(problems)} module(s) do not fit this model: " + "; ".join(problems[:8]))
    return converted


def _lora_modules(comfy_state_dict):
    """``{module: (up, down, alpha or None)}`` of a ComfyUI-form state dict; other keys are an error."""
    modules = {}
    for key, tensor in comfy_state_dict.items():
        split = split_lora_key(key) if key.startswith(COMFY_PREFIX) else None
        if split is None or split[1] not in ("up", "down", "alpha") or not key.endswith(_COMFY_SUFFIX[split[1]]):
            raise ValueError(f"LoRA key {key!r} is not a plain LoRA key in ComfyUI form "
                             f"(diffusion_model.<module>.lora_up.weight, .lora_down.weight or .alpha)")
        modules.setdefault(split[0][len(COMFY_PREFIX):], {})[split[1]] = tensor
    result = {}
    for module, parts in modules.items():
        if "up" not in parts or "down" not in parts:
            missing = "lora_up" if "up" not in parts else "lora_down"
            raise ValueError(f"LoRA module {module!r} has no {missing} weight")
        result[module] = (parts["up"], parts["down"], parts.get("alpha"))
    return result


def to_reference(comfy_state_dict, reference_format):
    """Export a ComfyUI-form LoRA to the reference's format so DiffSynth-Studio loads it.

    ``kohya`` (FLUX.1): ``lora_unet_<module_with_underscores>.lora_up.weight`` / ``lora_down.weight`` /
    ``.alpha``. ``peft`` (Qwen-Image): ``<module>.lora_B.default.weight`` / ``lora_A.default.weight`` and no
    alpha, so alpha/rank is folded into lora_B (the reference applies scale 1).
    """
    if reference_format not in REFERENCE_FORMATS:
        raise ValueError(f"unknown reference LoRA format {reference_format!r}; expected one of {REFERENCE_FORMATS}")
    out = {}
    for module, (up, down, alpha) in _lora_modules(comfy_state_dict).items():
        rank = down.shape[0]
        alpha_value = float(alpha) if alpha is not None else float(rank)
        if reference_format == "kohya":
            name = KOHYA_PREFIX + module.replace(".", "_")
            out[name + ".lora_up.weight"] = up
            out[name + ".lora_down.weight"] = down
            out[name + ".alpha"] = torch.tensor(alpha_value)
        else:
            scale = alpha_value / rank
            out[module + ".lora_B.default.weight"] = (up.float() * scale).to(up.dtype) if scale != 1.0 else up
            out[module + ".lora_A.default.weight"] = down
    return out


def _metadata_strings(metadata):
    """safetensors metadata is str -> str: strings stay, everything else becomes JSON."""
    out = {}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str):
            raise ValueError(f"LoRA metadata key {key!r} is not a string")
        try:
            out[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        except TypeError as error:
            raise ValueError(f"LoRA metadata {key!r} cannot be written as JSON: {error}") from None
    return out


def save_lora(path, state_dict, metadata=None):
    """Write a LoRA as safetensors atomically: a temp file in the same folder, then ``os.replace``."""
    from safetensors.torch import save_file

    if not str(path).endswith(".safetensors"):
        raise ValueError(f"LoRA file name {os.path.basename(str(path))!r} must end with .safetensors")
    metadata = _metadata_strings(metadata)
    tensors = {}
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"LoRA key {key!r} holds a {type(tensor).__name__}, not a tensor")
        # A private contiguous CPU copy: safetensors refuses views and tensors that share memory.
        tensors[key] = tensor.detach().to("cpu").contiguous().clone()
    with atomic_path(path) as temp_path:
        save_file(tensors, temp_path, metadata=metadata)
    return path


def _check_safetensors(path):
    name = os.path.basename(str(path))
    if not os.path.isfile(path):
        raise ValueError(f"LoRA file {name!r} does not exist")
    if not name.endswith(".safetensors"):
        raise ValueError(f"LoRA file {name!r} is not a .safetensors file; only safetensors are loaded "
                         f"(pickle formats such as .ckpt/.pt/.bin are refused)")


def load_lora(path):
    """Read a LoRA state dict from a safetensors file (anything else is refused with a clear error)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _check_safetensors(path)
    try:
        return load_file(path)
    except SafetensorError as error:
        raise ValueError(f"LoRA file {os.path.basename(str(path))!r} is not a valid safetensors file: {error}")


def load_lora_metadata(path):
    """The metadata of a safetensors LoRA; values that hold JSON are decoded."""
    from safetensors import SafetensorError, safe_open

    _check_safetensors(path)
    try:
        with safe_open(path, framework="pt") as handle:
            raw = handle.metadata() or {}
    except SafetensorError as error:
        raise ValueError(f"LoRA file {os.path.basename(str(path))!r} is not a valid safetensors file: {error}")
    metadata = {}
    for key, value in raw.items():
        try:
            metadata[key] = json.loads(value)
        except ValueError:
            metadata[key] = value
    return metadata
