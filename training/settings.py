"""Training settings: every option of a training run, its default, limits and help text (the EliGen
Train node's inputs and tooltips, the ``train`` part of a run file), and the learning-rate schedule."""

import math
from dataclasses import dataclass

import torch

from .fields import problems, raise_problems, setting
from .loss import TIMESTEP_SAMPLERS

SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainSettings:
    """Every training option, its default and its help text: the single source of the EliGen Train node's
    inputs and tooltips (nodes/settings_inputs.py). Adding an option = adding one field here."""

    steps: int = setting(1000, "Optimizer steps.", min=1, max=1_000_000)
    learning_rate: float = setting(1e-4, "AdamW learning rate (reference: 1e-4).", min=1e-8, max=1.0, step=1e-5)
    batch_size: int = setting(1, "Images per micro-batch (one training size per batch).", min=1, max=64)
    grad_accumulation: int = setting(1, "Micro-batches per optimizer step.", min=1, max=256)
    schedule: str = setting("constant", "Learning-rate schedule after warm-up (linear and cosine decay to 0).",
                            choices=SCHEDULES)
    warmup_steps: int = setting(0, "Linear warm-up steps.", min=0, max=100_000)
    weight_decay: float = setting(0.01, "AdamW weight decay (reference: 0.01).", min=0.0, max=1.0, step=0.001)
    max_grad_norm: float = setting(1.0, "Gradient clipping norm; 0 turns it off.", min=0.0, max=100.0, step=0.1)
    timestep_sampling: str = setting(
        "reference", "reference: the reference's 1000 shifted timesteps with its Gaussian loss weighting; "
                     "logit_normal: sigmoid of a normal; uniform.", choices=TIMESTEP_SAMPLERS)
    entity_weight: float = setting(0.0, "Extra loss weight inside the entity masks (0 = plain MSE, as the reference).",
                                   min=0.0, max=10.0, step=0.1)
    precision: str = setting("bf16", "Autocast for the forward pass; the LoRA weights keep their own dtype. On CPU "
                                     "only fp32 or bf16 make sense.", choices=tuple(PRECISIONS))
    gradient_checkpointing: bool = setting(True, "Recompute each block in the backward pass: much less memory, "
                                                 "~30% slower.")
    entity_dropout: float = setting(0.0, "Probability of dropping each entity of a sample in a step.",
                                    min=0.0, max=0.95, step=0.05)
    caption_dropout: float = setting(0.0, "Probability of replacing the global caption with the empty prompt.",
                                     min=0.0, max=0.95, step=0.05)
    seed: int = setting(0, "Seeds everything random in training: the same seed repeats a run exactly.",
                        min=0, max=2**31 - 1)
    checkpoint_every: int = setting(250, "Write a checkpoint every N steps (0: only at the end, on Cancel or on a "
                                         "non-finite loss). The last keep_checkpoints (3) are kept.", min=0, max=1_000_000)
    keep_checkpoints: int = setting(3, "How many step checkpoints to keep.", min=0, max=1000, node=False)
    validation_every: int = setting(0, "Sample validation images every N steps (0: off), previewed on the node.",
                                    min=0, max=1_000_000)
    validation_steps: int = setting(20, "Euler steps of each validation image.", min=1, max=200)
    validation_guidance: float = setting(
        3.5, "Embedded guidance of the validation images for guidance-distilled models (FLUX.1-dev; training "
             "itself uses 1 as the reference). Others ignore it.", min=0.0, max=100.0, step=0.1, optional=True)
    max_vram_gb: float = setting(
        0.0, "GPU memory budget in GB. 0 = automatic: on CUDA what the card has minus 1 GB (CUDA context, display), "
             "no limit on the CPU. The trainer estimates what a step needs and keeps just enough transformer blocks "
             "in CPU memory, streaming each to the GPU when it runs (block swap); the log says the budget, how many "
             "blocks and why. Set a number to use less of the card.", min=0.0, max=1024.0, step=0.5, optional=True)
    blocks_to_swap: int = setting(-1, "Transformer blocks kept in CPU memory and streamed to the GPU: -1 chooses "
                                      "from max_vram_gb; N swaps exactly N blocks.", min=-1, max=1000, optional=True)

    def field_problems(self):
        """{field: message}: types and the node's limits, except where a plain call may go further (a
        learning rate above 1, a dropout up to 1, any finite non-negative decay, norm or weight)."""
        custom = {
            "learning_rate": lambda v: None if v > 0 and math.isfinite(v) else
            f"learning_rate must be a positive number (got {v})",
            "blocks_to_swap": lambda v: None if v >= -1 else f"blocks_to_swap must be -1 (automatic) or >= 0 (got {v})",
        }
        for name in ("weight_decay", "max_grad_norm", "entity_weight", "validation_guidance", "max_vram_gb"):
            custom[name] = lambda v, name=name: None if v >= 0 and math.isfinite(v) else \
                f"{name} must be a finite number >= 0 (got {v})"
        for name in ("entity_dropout", "caption_dropout"):
            custom[name] = lambda v, name=name: None if 0.0 <= v < 1.0 else f"{name} must be in [0, 1) (got {v})"
        return problems(self, custom)

    def validate(self):
        raise_problems("training settings", self.field_problems())
        return self


def lr_lambda(settings):
    """Multiplier of the base learning rate after ``step`` optimizer updates (LambdaLR convention)."""
    warmup, total = settings.warmup_steps, settings.steps

    def factor(step):
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if settings.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if settings.schedule == "linear":
            return 1.0 - progress
        return 1.0

    return factor
