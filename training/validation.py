"""Validation during training: which sample is drawn (``validation_sample``), a small Euler sampler
through the training forward (``sample_latents``), and the VAE decode of its result."""

import torch

from ..core import host
from ..core.mask_rule import resize_nearest
from .batching import stack_condition
from .faults import check_validation_inputs
from .sample import Sample


def validation_sample(first, positive=None, entities=None, latent_scale=8):
    """What validation samples: the given prompt/entities at the first record's size, else the first record."""
    if positive is None and entities is None:
        return first
    context, pooled = first.context, first.pooled
    if positive is not None:
        context = positive[0][0]
        pooled = positive[0][1].get("pooled_output", pooled)
    embeds, masks = first.entity_embeds, first.masks
    check_validation_inputs(first, positive, entities, first.context.shape[-1])
    if entities is not None:
        size = tuple(first.masks.shape[-2:]) if first.masks.numel() else None
        if size is None:
            size = tuple(int(s) * latent_scale for s in first.latent.shape[-2:])
        embeds = [e.embeds for e in entities]
        masks = torch.stack([resize_nearest(e.mask.float(), size) for e in entities]) \
            if entities else torch.zeros(0, *size)
    return Sample(first.latent, context, pooled, list(embeds), masks)


@torch.no_grad()
def sample_latents(training_model, sample, steps, seed, guidance=1.0):
    """Euler flow sampling of one latent with the sample's prompt and entities (no CFG: FLUX-dev style
    guidance distillation or a LoRA trained without a negative)."""
    model_sampling = training_model.patched.get_model_object("model_sampling")
    sigmas = host.models.simple_sigmas(model_sampling, steps).float()
    device = training_model.device
    x = torch.randn((1,) + tuple(sample.latent.shape), generator=torch.Generator().manual_seed(seed)).to(device)
    context, pooled, condition = stack_condition([sample], device)
    dtype = training_model.compute_dtype
    for i in range(steps):
        sigma = sigmas[i:i + 1].to(device)
        v = training_model.velocity(x.to(dtype), sigma, context.to(dtype),
                                    None if pooled is None else pooled.to(dtype), condition, guidance).float()
        x = x + (sigmas[i + 1] - sigmas[i]).to(device) * v
    return x


def validation_images(model, validation, settings, decode):
    """Validation images [B, H, W, 3] (or a list of latents when no decoder is given)."""
    outputs = []
    for index, sample in enumerate(validation):
        latent = sample_latents(model, sample, settings.validation_steps, seed=settings.seed + index,
                                guidance=settings.validation_guidance)
        latent = model.latent_format.process_out(latent.cpu())
        outputs.append(decode(latent) if decode is not None else latent)
    if decode is None:
        return outputs
    return torch.cat([o.float().cpu().clamp(0, 1) for o in outputs])


def decode_images(vae, latent):
    images = vae.decode(latent)
    if images.ndim == 5:  # video-style VAEs return [B, T, H, W, 3]
        images = images.reshape(-1, *images.shape[-3:])
    return images


def decode_and_release(vae, latent):
    """Validation images: the VAE comes to the GPU for the decode only."""
    try:
        return decode_images(vae, latent)
    finally:
        if getattr(vae, "patcher", None) is not None:
            host.memory.unload_model(vae.patcher)
