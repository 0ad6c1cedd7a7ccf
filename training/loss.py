"""Flow-matching loss on the velocity, timestep samplers, and the entity-region weight map.

Noise path (rectified flow, as the reference): ``x_t = (1 - s) * x0 + s * noise``; the model predicts
the velocity, target ``noise - x0``; mean squared error computed in fp32.
"""

import math

import torch
import torch.nn.functional as F

TIMESTEP_SAMPLERS = ("reference", "logit_normal", "uniform")

# The reference's 1000-step training schedules (DiffSynth FlowMatchScheduler, training mode); each family
# adapter holds its own (``adapter.reference_schedule``):
# "linear": s' = shift*s / (1 + (shift-1)*s) on linspace(1, sigma_min, N).
# "exponential": s' = e^mu / (e^mu + 1/s - 1) on linspace(1, 0, N+1)[:-1], then stretched so the last
# sigma is `terminal`.
SCHEDULE_KINDS = ("linear", "exponential")
NUM_TRAIN_TIMESTEPS = 1000


def reference_sigmas(spec, steps=NUM_TRAIN_TIMESTEPS):
    """The reference's discrete training sigmas for a schedule spec (an adapter's ``reference_schedule``),
    from high to low noise (float64)."""
    if not isinstance(spec, dict) or spec.get("kind") not in SCHEDULE_KINDS:
        raise ValueError(f"no reference timestep schedule: {spec!r} is not one of the kinds {', '.join(SCHEDULE_KINDS)}")
    if spec["kind"] == "linear":
        s = torch.linspace(1.0, spec["sigma_min"], steps, dtype=torch.float64)
        return spec["shift"] * s / (1 + (spec["shift"] - 1) * s)
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
    s = math.exp(spec["mu"]) / (math.exp(spec["mu"]) + (1 / s - 1))
    one_minus = 1 - s
    return 1 - one_minus / (one_minus[-1] / (1 - spec["terminal"]))


def reference_weights(sigmas):
    """Loss weight of each of the reference's training ``sigmas``: a Gaussian bump over the timestep
    ``1000 * sigma`` (the shifted value, not the index: peak where sigma is 0.5), lifted so its minimum
    is 0, normalised to mean 1 (float64)."""
    t = sigmas.to(torch.float64) * NUM_TRAIN_TIMESTEPS
    bump = torch.exp(-2 * ((t - NUM_TRAIN_TIMESTEPS / 2) / NUM_TRAIN_TIMESTEPS) ** 2)
    bump = bump - bump.min()
    return bump * (len(sigmas) / bump.sum())


class TimestepSampler:
    """Draws (sigma, loss weight) per batch element from a torch.Generator.

    reference:    index uniform over the 1000 shifted sigmas of ``schedule`` (the family adapter's
                  ``reference_schedule``), Gaussian-bump loss weight over ``1000 * sigma``.
    logit_normal: sigma = sigmoid(N(mean, std)), weight 1.
    uniform:      sigma ~ U(0, 1), weight 1.
    """

    def __init__(self, kind, schedule=None, logit_mean=0.0, logit_std=1.0):
        if kind not in TIMESTEP_SAMPLERS:
            raise ValueError(f"timestep sampling {kind!r} is not one of {', '.join(TIMESTEP_SAMPLERS)}")
        self.kind = kind
        self.logit_mean, self.logit_std = logit_mean, logit_std
        if kind == "reference":
            sigmas = reference_sigmas(schedule)
            self.sigmas = sigmas.float()
            self.weights = reference_weights(sigmas).float()

    def __call__(self, batch, generator):
        if self.kind == "reference":
            index = torch.randint(0, len(self.sigmas), (batch,), generator=generator)
            return self.sigmas[index], self.weights[index]
        if self.kind == "logit_normal":
            z = torch.randn(batch, generator=generator) * self.logit_std + self.logit_mean
            return torch.sigmoid(z), torch.ones(batch)
        return torch.rand(batch, generator=generator), torch.ones(batch)


def noisy_latent(x0, noise, sigma):
    """``(1 - s) * x0 + s * noise`` with sigma broadcast over [B, ...]."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0, noise):
    return noise - x0


def entity_region_weight(masks, latent_hw, extra_weight):
    """Per-pixel loss weight on the latent grid: 1 outside every entity, ``1 + extra_weight`` inside the
    union of the entity masks. masks: [B, N, H, W] in [0, 1] at image resolution (N may be 0).
    Returns [B, 1, h, w] float32."""
    batch = masks.shape[0]
    if masks.shape[1] == 0 or extra_weight == 0:
        return torch.ones(batch, 1, *latent_hw)
    union = masks.float().amax(dim=1, keepdim=True)
    union = F.interpolate(union, size=tuple(latent_hw), mode="nearest-exact")
    return 1 + extra_weight * (union > 0.5).float()


def flow_matching_loss(prediction, target, timestep_weight, region_weight=None):
    """Weighted MSE in fp32 (or wider: float64 models keep float64). prediction/target: [B, C, ...];
    timestep_weight: [B]; region_weight: None or broadcastable to prediction, e.g. [B, 1, h, w].
    Region weights are normalised per sample so they change where the loss looks, not its scale."""
    dtype = torch.promote_types(prediction.dtype, torch.float32)
    error = (prediction.to(dtype) - target.to(dtype)) ** 2
    if region_weight is not None:
        region_weight = region_weight.to(error)
        while region_weight.ndim < error.ndim:  # e.g. a time axis in 5D latents
            region_weight = region_weight.unsqueeze(2)
        region_weight = region_weight / region_weight.mean(dim=tuple(range(1, region_weight.ndim)), keepdim=True)
        error = error * region_weight
    per_sample = error.mean(dim=tuple(range(1, error.ndim)))
    return (per_sample * timestep_weight.to(per_sample)).mean()
