"""LoRA layers for training, through peft: settings, injection, extraction, removal.

Config (``LoraSettings``), injection (``inject``: peft wraps the chosen ``nn.Linear`` modules of the
diffusion model in place) and extraction/removal are separate steps, as in peft. The diffusion model
belongs to a MODEL shared by the whole graph, so ``remove`` puts every original module back and
restores ``requires_grad``; callers run it in a ``finally``. peft is imported by ``inject`` (the first
step that needs it), so the settings and everything that imports this module work without it.
"""

import math
import re
import sys
from dataclasses import asdict, dataclass

import torch

from .fields import problems, raise_problems, setting
from .peft_requirement import import_peft

INITS = {"kaiming": True, "gaussian": "gaussian"}  # peft's init_lora_weights; both start with B = 0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CUSTOM = "custom"
ALL_BLOCK_LINEARS = "all_block_linears"
PRESETS = ("eligen", "no_modulation", "attention", ALL_BLOCK_LINEARS, CUSTOM)  # every family has the first three
ADAPTER_NAME = "default"


@dataclass
class LoraSettings:
    """Which layers get a LoRA and how it is shaped: the EliGen LoRA Config node's inputs and tooltips
    (nodes/settings_inputs.py) and the ``lora`` part of a run file."""

    rank: int = setting(32, "LoRA rank (inner size of each adapter).", min=1, max=1024)
    alpha: float = setting(32.0, "LoRA alpha; the update is scaled by alpha / rank (alpha = rank: scale 1, as the "
                                 "reference).", min=0.001, max=4096.0, step=0.5)
    dropout: float = setting(0.0, "Dropout on the LoRA input during training (0 in the reference).",
                             min=0.0, max=0.9, step=0.01)
    init: str = setting("kaiming", "Initial A matrices (B starts at zero, so training starts from the base model): "
                                   "kaiming = peft's default, gaussian = normal / rank.", choices=tuple(INITS))
    preset: str = setting(
        "eligen", "Target layers. eligen: the reference's targets (FLUX: attention, MLP and modulation of every "
                  "block; Qwen-Image: attention, MLP down-projections, modulation). no_modulation / attention: "
                  "subsets. all_block_linears: every Linear in the blocks. custom: the regex below.", choices=PRESETS)
    custom_pattern: str = setting("", "With preset 'custom': a regex that must fully match ComfyUI module names, "
                                      r"e.g. double_blocks\.\d+\.img_attn\.(qkv|proj)", optional=True)
    dtype: str = setting("float32", "Dtype of the LoRA weights while training (float32 = an fp32 master copy even "
                                    "when the model runs in bf16).", choices=tuple(DTYPES))

    def field_problems(self, adapter=None):
        """{field: message}: types and limits; the preset among ``adapter``'s when one is given; a custom
        pattern that compiles. A plain call may use an alpha above the node's maximum, a dropout up to 1."""
        def preset(value):
            names = preset_names(adapter) if adapter is not None else PRESETS
            if value not in names:
                return f"preset {value!r} is not one of {', '.join(names)}" + (
                    f" for {adapter.family}" if adapter is not None else "")
            return None

        def custom_pattern(value):
            if self.preset != CUSTOM:
                return None
            if not value.strip():
                return "preset 'custom' needs a custom_pattern (a regex over module names)"
            try:
                re.compile(value)
            except re.error as error:
                return f"custom_pattern {value!r} is not a valid regex: {error}"
            return None

        return problems(self, {
            "alpha": lambda v: None if v > 0 and math.isfinite(v) else f"alpha must be a positive finite number (got {v})",
            "dropout": lambda v: None if 0.0 <= v < 1.0 else f"dropout must be in [0, 1) (got {v})",
            "preset": preset, "custom_pattern": custom_pattern})

    def validate(self, adapter=None):
        raise_problems("LoRA settings", self.field_problems(adapter))
        return self

    def to_dict(self):
        return asdict(self)


def preset_names(adapter):
    return list(adapter.LORA_TARGETS) + [ALL_BLOCK_LINEARS, CUSTOM]


def target_patterns(settings, adapter):
    if settings.preset == CUSTOM:
        return [settings.custom_pattern]
    if settings.preset == ALL_BLOCK_LINEARS:
        # The block lists are the ones training replaces, so this needs no per-family table.
        lists = sorted({attribute for attribute, _ in adapter.training_blocks.values()})
        return [r"(" + "|".join(lists) + r")\.\d+\..+"]
    return list(adapter.LORA_TARGETS[settings.preset])


def matching_linears(diffusion_model, patterns):
    """Names of the ``nn.Linear`` modules whose name fully matches one of the regexes, in model order."""
    compiled = [re.compile(p) for p in patterns]
    return [
        name for name, module in diffusion_model.named_modules()
        if isinstance(module, torch.nn.Linear) and any(c.fullmatch(name) for c in compiled)
    ]


def parameter_count(diffusion_model, settings, adapter):
    """How many LoRA weights ``inject`` would add (A: rank x in, B: out x rank per target Linear), read
    from the model before injection and without peft (the memory plan is made before loading)."""
    targets = matching_linears(diffusion_model, target_patterns(settings, adapter))
    return sum(settings.rank * (linear.in_features + linear.out_features)
               for linear in map(diffusion_model.get_submodule, targets))


def lora_layers(diffusion_model):
    """{module name: peft LoRA layer} currently injected in the model."""
    peft = sys.modules.get("peft")
    if peft is None:  # never imported in this process, so no model holds its layers
        return {}
    return {
        name: module for name, module in diffusion_model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }


def inject(diffusion_model, settings, adapter):
    """Wrap the target Linears of ``diffusion_model`` with peft LoRA layers; freeze everything else.
    Returns the wrapped module names. Undo with ``remove``."""
    peft = import_peft()
    settings.validate(adapter)
    if lora_layers(diffusion_model):
        raise ValueError("this model already has LoRA training layers injected (a training run still active?)")
    names = matching_linears(diffusion_model, target_patterns(settings, adapter))
    if not names:
        pattern = " | ".join(target_patterns(settings, adapter))
        examples = [n for n, m in diffusion_model.named_modules() if isinstance(m, torch.nn.Linear)][:5]
        raise ValueError(
            f"LoRA preset {settings.preset!r} ({pattern}) matches no Linear module of this "
            f"{adapter.family} model; module names look like: {', '.join(examples)}"
        )
    # Remember requires_grad so `remove` can restore the shared model exactly.
    diffusion_model._eligen_requires_grad = {n: p.requires_grad for n, p in diffusion_model.named_parameters()}
    config = peft.LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        init_lora_weights=INITS[settings.init],
        target_modules=names,
        bias="none",
    )
    try:
        peft.inject_adapter_in_model(config, diffusion_model, adapter_name=ADAPTER_NAME)
        dtype = DTYPES[settings.dtype]
        for param in diffusion_model.parameters():
            param.requires_grad_(False)
        for layer in lora_layers(diffusion_model).values():
            # peft gives the LoRA the base layer's dtype: on a bf16 or fp8 base its initial A is rounded to
            # that dtype. Draw it again in the LoRA dtype, so the start does not depend on how the base is
            # stored (an fp8 base and the same weights in bf16 start alike).
            rounded = layer.lora_A[ADAPTER_NAME].weight.dtype != dtype
            for module in (layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]):
                module.weight.data = module.weight.data.to(dtype)
            if rounded:
                layer.reset_lora_parameters(ADAPTER_NAME, INITS[settings.init])
        for param in lora_parameters(diffusion_model):
            param.requires_grad_(True)
    except BaseException:
        remove(diffusion_model)
        raise
    return names


def lora_parameters(diffusion_model):
    """The trainable LoRA tensors in a fixed order (module order, A before B)."""
    params = []
    for layer in lora_layers(diffusion_model).values():
        params.append(layer.lora_A[ADAPTER_NAME].weight)
        params.append(layer.lora_B[ADAPTER_NAME].weight)
    return params


def named_lora_parameters(diffusion_model):
    """{"<module>.lora_A" / "<module>.lora_B": parameter}, same order as ``lora_parameters``."""
    named = {}
    for name, layer in lora_layers(diffusion_model).items():
        named[f"{name}.lora_A"] = layer.lora_A[ADAPTER_NAME].weight
        named[f"{name}.lora_B"] = layer.lora_B[ADAPTER_NAME].weight
    return named


def lora_state_dict(diffusion_model, dtype=torch.float32):
    """ComfyUI-format LoRA weights: ``diffusion_model.<module>.lora_down/lora_up.weight`` and ``.alpha``
    (the stock loader applies ``up @ down * alpha / rank``, the same scale peft uses)."""
    state = {}
    for name, layer in lora_layers(diffusion_model).items():
        key = f"diffusion_model.{name}"
        down = layer.lora_A[ADAPTER_NAME].weight
        state[f"{key}.lora_down.weight"] = down.detach().to("cpu", dtype).contiguous().clone()
        state[f"{key}.lora_up.weight"] = layer.lora_B[ADAPTER_NAME].weight.detach().to("cpu", dtype).contiguous().clone()
        alpha = layer.scaling[ADAPTER_NAME] * down.shape[0]
        state[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return state


def load_lora_tensors(diffusion_model, tensors):
    """Copy {"<module>.lora_A"/"lora_B": tensor} (as from ``named_lora_parameters``) into the layers.
    Used by resume; names and shapes must match exactly."""
    named = named_lora_parameters(diffusion_model)
    missing = sorted(set(named) - set(tensors))
    extra = sorted(set(tensors) - set(named))
    if missing or extra:
        raise ValueError(
            "checkpoint LoRA does not match the LoRA settings: "
            + (f"missing {missing[:3]} " if missing else "")
            + (f"unexpected {extra[:3]}" if extra else "")
        )
    with torch.no_grad():
        for name, param in named.items():
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise ValueError(
                    f"checkpoint LoRA tensor {name} has shape {tuple(tensors[name].shape)}, "
                    f"the model's has {tuple(param.shape)} (different rank or model?)"
                )
            param.copy_(tensors[name].to(param))


def remove(diffusion_model):
    """Put every original Linear back and restore requires_grad: the model is as before ``inject``."""
    for name, layer in lora_layers(diffusion_model).items():
        parent_name, _, child = name.rpartition(".")
        parent = diffusion_model.get_submodule(parent_name) if parent_name else diffusion_model
        setattr(parent, child, layer.get_base_layer())
    flags = getattr(diffusion_model, "_eligen_requires_grad", None)
    if flags is not None:
        for name, param in diffusion_model.named_parameters():
            if name in flags and param.requires_grad != flags[name]:
                # Weights loaded by a node are inference tensors (nodes run under inference_mode), and
                # torch only lets requires_grad=True be set on those inside inference mode.
                with torch.inference_mode(param.is_inference()):
                    param.requires_grad_(flags[name])
        del diffusion_model._eligen_requires_grad
    if "peft_config" in vars(diffusion_model):
        del diffusion_model.peft_config
