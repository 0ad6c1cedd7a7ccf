"""LoRA and weights: ComfyUI's LoRA key map and the key forms its loader takes, the weight patches a
ModelPatcher holds and the originals of weights patched in place, and applying a LoRA the stock way."""

import functools

import torch

from . import RUNTIME, attribute, comfy_module, contact_point, keyword_parameters, missing


@contact_point("ModelPatcher.backup", RUNTIME)
def patched_weight_originals(patcher):
    """``{weight key: original tensor}`` for weights a ModelPatcher currently has patched in place (its
    ``backup``). Empty when nothing is patched."""
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


@contact_point("ModelPatcher.patches", RUNTIME)
def weight_patches(patcher):
    """``{weight key: [patch entries]}`` a ModelPatcher holds (LoRAs and other weight patches). Empty for
    anything without patches."""
    patches = getattr(patcher, "patches", None) if patcher is not None else None
    if patches is None:
        return {}
    if not isinstance(patches, dict):
        raise missing("ModelPatcher.patches", f"patches is a {type(patches).__name__}, not a dict")
    return patches


@contact_point("sd.load_lora_for_models", RUNTIME)
def apply_lora(model, state_dict, strength=1.0):
    """A clone of ``model`` with a ComfyUI-form LoRA state dict applied the stock way (what
    LoraLoaderModelOnly does)."""
    contact = "sd.load_lora_for_models"
    load = attribute(comfy_module("comfy.sd", contact), "load_lora_for_models", contact)
    patched, _ = load(model, None, state_dict, strength, 0)
    return patched


@contact_point("lora.model_lora_keys_unet", RUNTIME)
def lora_key_map(model):
    """ComfyUI's LoRA key map (LoRA module name -> weight key or (weight key, slice)) of a ModelPatcher or
    BaseModel."""
    contact = "lora.model_lora_keys_unet"
    keys_unet = attribute(comfy_module("comfy.lora", contact), "model_lora_keys_unet", contact)
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


@contact_point("LoRA key forms")
@functools.lru_cache(maxsize=None)
def lora_forms():
    """The forms of ``LORA_FORMS`` this ComfyUI's loader takes, found by loading a probe of each."""
    contact = "lora.load_lora key forms"
    load = attribute(comfy_module("comfy.lora", contact), "load_lora", contact)
    keyword_parameters(load, ("lora", "to_load", "log_missing"), contact)
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
