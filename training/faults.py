"""Checks on what training is handed, before the first step: non-finite encodings and validation
inputs that do not fit the training data. Each ValueError names the sample (and its prompt)."""

import torch

from ..core.conditioning import describe, embedding_problem
from ..core.mask_rule import aspect_problem


def sample_name(index, sample):
    prompt = getattr(sample, "prompt", "")
    record = getattr(sample, "index", -1)
    record = index if record is None or record < 0 else record  # -1: not from a dataset record
    return f"training sample {record}" + (f' ("{prompt[:40]}")' if prompt else "")


def _parts(sample):
    """(name, tensor, whether it is text embeddings) of every tensor of a sample."""
    yield "latent (VAE encoding of the image)", sample.latent, False
    yield "prompt embeddings", sample.context, True
    if sample.pooled is not None:
        yield "pooled prompt embedding", sample.pooled, True
    for k, embeds in enumerate(sample.entity_embeds):
        yield f"entity {k + 1} embeddings", embeds, True
    yield "entity masks", sample.masks, False


def check_finite_samples(samples, what="training"):
    """ValueError naming the first sample and part that holds NaN or inf, or text embeddings that are
    absurdly large (core/conditioning.py: ``embedding_problem``, the entity nodes' check): never trained on."""
    for index, sample in enumerate(samples):
        for part, tensor, text in _parts(sample):
            if tensor is None or not tensor.is_floating_point():
                continue
            if text:
                problem = embedding_problem(tensor)
            else:
                problem = None if bool(torch.isfinite(tensor).all()) else "holds NaN or inf values"
            if problem:
                name = sample_name(index, sample) if what == "training" else f"{what} sample {index}"
                raise ValueError(f"{name}: its {part} {problem}; check the image and prompts of that record "
                                 f"(and the encoder that made them)")


def check_validation_inputs(first, positive, entities, text_width):
    """The optional validation prompt and entities must fit the first training sample (its text width
    and its aspect), as sampling with them would require."""
    if positive is not None:
        for tensor, _ in positive:
            if tensor.shape[-1] != text_width:
                raise ValueError(f"validation_positive: its text embeddings are {tensor.shape[-1]} wide but the "
                                 f"training prompts are {text_width}; encode it with the model's text encoder")
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError("validation_positive: its text embeddings hold NaN or inf values")
    if entities:
        latent_hw = tuple(first.latent.shape[-2:])
        for index, entity in enumerate(entities):
            problem = aspect_problem(tuple(entity.mask.shape[-2:]), latent_hw)
            if problem:
                raise ValueError(f"validation_entities: {describe(index, entity.label)}: {problem}; validation "
                                 f"samples at the first training image's size, so draw masks at its aspect")
            if entity.embeds.shape[-1] != text_width:
                raise ValueError(f"validation_entities: {describe(index, entity.label)}: its text embeddings are "
                                 f"{entity.embeds.shape[-1]} wide but the training prompts are {text_width}")
