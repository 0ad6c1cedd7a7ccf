"""The trainer's gradients are right: float64 central differences against autograd, for every LoRA
parameter group, on tiny FLUX.1 and Qwen-Image, with entity masks active, checkpointing on and off.

The loss is the training loss itself (``training.loop.batch_loss``): same forward (the EliGen wrapper and
attention override from core/patch.py, the out-of-place blocks from core/blocks.py), same noise path.
"""

import pytest
import torch

from comfyui_eligen.training import lora
from comfyui_eligen.training.model import TrainingModel, batch_loss
from comfyui_eligen.training.sample import Sample
from comfyui_eligen.training.settings import TrainSettings
from comfyui_eligen.training.loss import TimestepSampler

from tiny_models import TINY_MODELS, TEXT_WIDTH



def make_samples(family, count=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    latent_shape = (16, 8, 8) if family == "flux" else (16, 1, 8, 8)
    samples = []
    for _ in range(count):
        masks = torch.zeros(2, 64, 64)
        masks[0, :32, :40] = 1   # entity 0: top-left region
        masks[1, 24:, 16:] = 1   # entity 1: bottom-right region, overlapping entity 0
        samples.append(Sample(
            latent=torch.randn(latent_shape, generator=g, dtype=dtype),
            context=torch.randn(1, 4, TEXT_WIDTH, generator=g, dtype=dtype),
            pooled=torch.randn(1, TEXT_WIDTH, generator=g, dtype=dtype) if family == "flux" else None,
            entity_embeds=[torch.randn(1, 3, TEXT_WIDTH, generator=g, dtype=dtype) for _ in range(2)],
            masks=masks,
        ))
    return samples


def model_for(family):
    if family == "flux":  # FLUX.1-dev-like: the guidance embedding is trained with guidance 1
        return TINY_MODELS[family](dtype=torch.float64, guidance_embed=True)
    return TINY_MODELS[family](dtype=torch.float64)


def randomise_lora(model, seed):
    """float64 LoRA weights with A and B both non-zero, so every group has a gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters:
            param.data = (0.3 * torch.randn(param.shape, generator=g, dtype=torch.float64))


def loss_fn(model, samples, settings):
    sampler = TimestepSampler("uniform")
    return batch_loss(model, samples, sampler, settings, torch.Generator().manual_seed(7))


@pytest.mark.parametrize("family", ["flux", "qwen_image"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_gradients_match_finite_differences(family, checkpointing):
    samples = make_samples(family)
    settings = TrainSettings(entity_weight=1.5)  # the region weight path is part of the loss too
    lora_settings = lora.LoraSettings(rank=2, alpha=3.0, preset="eligen")
    with torch.inference_mode(False), TrainingModel(model_for(family), lora_settings, checkpointing) as model:
        randomise_lora(model, seed=1)
        params = lora.named_lora_parameters(model.diffusion_model)
        assert len(params) == 2 * len(model.targets) and len(params) >= 16

        loss = loss_fn(model, samples, settings)
        # allow_unused: Qwen-Image's last block computes a text stream nobody reads, so LoRA on its
        # text-side modules gets no gradient (finite differences must then be zero too).
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), grads)]

        g = torch.Generator().manual_seed(2)
        eps = 1e-6
        checked, alive = 0, 0
        for (name, param), grad in zip(params.items(), grads):
            direction = torch.randn(param.shape, generator=g, dtype=torch.float64)
            with torch.no_grad():
                original = param.detach().clone()
                param.copy_(original + eps * direction)
                plus = loss_fn(model, samples, settings).item()
                param.copy_(original - eps * direction)
                minus = loss_fn(model, samples, settings).item()
                param.copy_(original)
            numeric = (plus - minus) / (2 * eps)
            analytic = (grad * direction).sum().item()
            alive += abs(analytic) > 1e-8
            assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9), f"{name}: autograd {analytic} vs FD {numeric}"
            checked += 1
        assert checked == len(params) and alive >= 0.8 * len(params)

        # The entity masks are really in the loss: other masks give other gradients.
        for sample in samples:
            sample.masks = sample.masks.flip(-1)
        moved = torch.autograd.grad(loss_fn(model, samples, settings), list(params.values()), allow_unused=True)
        assert max((a - b).abs().max().item() for a, b in zip(grads, moved) if b is not None) > 1e-6
