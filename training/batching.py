"""Which samples train in which step, and with which randomness.

One step = ``grad_accumulation`` micro-batches; a micro-batch holds ``batch_size x world`` samples (all
ranks' together), of one layout (``layout_key``: same latent shape and text lengths), so it is one
forward. Batch order is a function of (seed, epoch); the randomness of each sample (noise, timestep,
entity and caption dropout) a function of (seed, step, slot of the sample in the step) alone. So a
resumed run repeats an uninterrupted one, and under torchrun the result does not depend on how the
samples of a step are spread over ranks.

The loop asks for ``micro_batch(stream, settings, step, micro, rank, empty)``: the samples this rank
trains (dropout applied) and their generators; everything about grouping lives here.
"""

import hashlib
from dataclasses import dataclass

import torch

from ..core.conditioning import EntityCondition
from .sample import Sample


def step_generator(seed, step, purpose):
    """A generator for step ``step`` that depends only on (seed, step, purpose)."""
    mixed = (seed * 1_000_003 + step * 7919 + purpose * 104_729) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def sample_generator(seed, step, slot):
    """The generator of the sample in position ``slot`` of step ``step`` (a function of those alone)."""
    digest = hashlib.sha256(f"eligen-sample:{seed}:{step}:{slot}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def layout_key(sample):
    """Samples with equal keys run in one forward: same latent shape and text segment lengths."""
    return (tuple(sample.latent.shape), tuple(e.shape[1] for e in sample.entity_embeds), sample.context.shape[1])


def epoch_batches(samples, batch_size, seed, epoch):
    """Batches of sample indices for one epoch, reproducible from (seed, epoch). Each batch holds one
    layout (``layout_key``) so it is one forward pass; a layout's remainder makes a smaller batch."""
    generator = step_generator(seed, epoch, purpose=1)
    groups = {}
    for index, sample in enumerate(samples):
        groups.setdefault(layout_key(sample), []).append(index)
    batches = []
    for key in sorted(groups):
        members = [groups[key][i] for i in torch.randperm(len(groups[key]), generator=generator).tolist()]
        batches += [members[i:i + batch_size] for i in range(0, len(members), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


class BatchStream:
    """Endless stream of batches over epochs; position k is a pure function of (seed, k)."""

    def __init__(self, samples, batch_size, seed):
        self.samples, self.batch_size, self.seed = samples, batch_size, seed
        self._epoch, self._batches = None, None

    def batch(self, position):
        per_epoch = len(epoch_batches(self.samples, self.batch_size, self.seed, 0))
        epoch, index = divmod(position, per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(self.samples, self.batch_size, self.seed, epoch)
        return [self.samples[i] for i in self._batches[index]]


@dataclass
class MicroBatch:
    """What one rank trains in one micro-batch: ``samples`` (dropout applied; may be empty on a short
    last batch), one generator per sample, and the size of the whole micro-batch over all ranks (each
    rank's loss is divided by it, so the sum over ranks is the mean)."""
    samples: list
    generators: list
    whole: int
    first: Sample  # the micro-batch's first sample (FSDP pads with zero-weighted copies of it)


def micro_batch(stream, settings, step, micro, rank, empty):
    whole = stream.batch(step * settings.grad_accumulation + micro)  # all ranks' samples
    slots = range(rank * settings.batch_size, min(len(whole), (rank + 1) * settings.batch_size))
    generators = [sample_generator(settings.seed, step, micro * stream.batch_size + j) for j in slots]
    samples = [drop_entities(whole[j], settings, empty, g) for j, g in zip(slots, generators)]
    return MicroBatch(samples, generators, len(whole), whole[0])


def drop_entities(sample, settings, empty, generator):
    """Entity and caption dropout for one sample (a new Sample; the input is not modified)."""
    keep = [i for i in range(len(sample.entity_embeds))
            if torch.rand((), generator=generator).item() >= settings.entity_dropout]
    context, pooled = sample.context, sample.pooled
    if settings.caption_dropout and torch.rand((), generator=generator).item() < settings.caption_dropout:
        context, pooled = empty
    return Sample(sample.latent, context, pooled, [sample.entity_embeds[i] for i in keep], sample.masks[keep])


def group_by_layout(batch):
    """Samples that can share one forward (dropout can split a batch that started as one layout)."""
    groups = {}
    for sample in batch:
        groups.setdefault(layout_key(sample), []).append(sample)
    return list(groups.values())


def stack_condition(samples, device):
    """Joint text context ``[E1..EN, G]`` per sample, pooled vectors and the EntityCondition (None
    without entities) for samples of one layout."""
    context = torch.cat([torch.cat(list(s.entity_embeds) + [s.context], dim=1) for s in samples]).to(device)
    pooled = None if samples[0].pooled is None else torch.cat([s.pooled for s in samples]).to(device)
    if not samples[0].entity_embeds:
        return context, pooled, None
    lengths = [e.shape[1] for e in samples[0].entity_embeds] + [samples[0].context.shape[1]]
    masks = torch.stack([s.masks for s in samples]).to(device)
    return context, pooled, EntityCondition.for_training(lengths, masks)
