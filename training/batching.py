"""Which samples train in which step, and with which randomness.

One step = ``grad_accumulation`` micro-batches; a micro-batch holds exactly ``batch_size x world``
samples (all ranks' together) of one aspect bucket (``bucket_key``: the latent shape). Any samples of a
bucket share a forward pass whatever their entities and prompt lengths: ``stack_condition`` pads them.
Each rank trains the ``batch_size`` consecutive slots of its rank, so every rank works in every micro-batch.

Per epoch each bucket is shuffled and cut into micro-batches; a bucket whose size is not a multiple of
the micro-batch completes its last one from the start of its own shuffled order (those few samples train
twice that epoch), so no micro-batch is short and no rank idles. Batch order is a function of (seed,
epoch, micro-batch size); the randomness of each sample (noise, timestep, entity and caption dropout) a
function of (seed, step, slot of the sample in the step) alone. So a resumed run repeats an
uninterrupted one, and under torchrun the result does not depend on how the samples of a step are
spread over ranks: the same global batch gives the same training on any number of processes.

The loop asks for ``micro_batch(stream, settings, step, micro, rank, empty)``: the samples this rank
trains (dropout applied) and their generators; everything about grouping lives here.
"""

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.conditioning import EntityCondition, pad_layout
from .sample import Sample


def step_generator(seed, step, purpose):
    """A generator for step ``step`` that depends only on (seed, step, purpose)."""
    mixed = (seed * 1_000_003 + step * 7919 + purpose * 104_729) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def sample_generator(seed, step, slot):
    """The generator of the sample in position ``slot`` of step ``step`` (a function of those alone)."""
    digest = hashlib.sha256(f"eligen-sample:{seed}:{step}:{slot}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def bucket_key(sample):
    """Samples with equal keys may share a micro-batch: the same latent shape (one aspect bucket)."""
    return tuple(sample.latent.shape)


def epoch_batches(samples, batch_size, seed, epoch):
    """Micro-batches of sample indices for one epoch, reproducible from (seed, epoch): each holds
    ``batch_size`` samples of one bucket (``bucket_key``); a bucket's last one is completed from the
    start of that bucket's shuffled order."""
    generator = step_generator(seed, epoch, purpose=1)
    groups = {}
    for index, sample in enumerate(samples):
        groups.setdefault(bucket_key(sample), []).append(index)
    batches = []
    for key in sorted(groups):
        members = [groups[key][i] for i in torch.randperm(len(groups[key]), generator=generator).tolist()]
        count = -(-len(members) // batch_size) * batch_size
        members = [members[i % len(members)] for i in range(count)]
        batches += [members[i:i + batch_size] for i in range(0, count, batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def batches_per_epoch(samples, batch_size):
    sizes = {}
    for sample in samples:
        sizes[bucket_key(sample)] = sizes.get(bucket_key(sample), 0) + 1
    return sum(-(-n // batch_size) for n in sizes.values())


class BatchStream:
    """Endless stream of micro-batches over epochs; position k is a pure function of (seed, k)."""

    def __init__(self, samples, batch_size, seed):
        self.samples, self.batch_size, self.seed = samples, batch_size, seed
        self.per_epoch = batches_per_epoch(samples, batch_size)
        self._epoch, self._batches = None, None

    def batch(self, position):
        epoch, index = divmod(position, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(self.samples, self.batch_size, self.seed, epoch)
        return [self.samples[i] for i in self._batches[index]]


@dataclass
class MicroBatch:
    """What one rank trains in one micro-batch: ``samples`` (dropout applied), one generator per sample,
    and the size of the whole micro-batch over all ranks (each rank's loss is divided by it, so the sum
    over ranks is the mean)."""
    samples: list
    generators: list
    whole: int


def micro_batch(stream, settings, step, micro, rank, empty):
    whole = stream.batch(step * settings.grad_accumulation + micro)  # all ranks' samples
    slots = range(rank * settings.batch_size, (rank + 1) * settings.batch_size)
    generators = [sample_generator(settings.seed, step, micro * stream.batch_size + j) for j in slots]
    samples = [drop_entities(whole[j], settings, empty, g) for j, g in zip(slots, generators)]
    return MicroBatch(samples, generators, len(whole))


def drop_entities(sample, settings, empty, generator):
    """Entity and caption dropout for one sample (a new Sample; the input is not modified)."""
    keep = [i for i in range(len(sample.entity_embeds))
            if torch.rand((), generator=generator).item() >= settings.entity_dropout]
    context, pooled = sample.context, sample.pooled
    if settings.caption_dropout and torch.rand((), generator=generator).item() < settings.caption_dropout:
        context, pooled = empty
    prompts = [sample.entity_prompts[i] for i in keep] if len(sample.entity_prompts) == len(sample.entity_embeds) else []
    return Sample(sample.latent, context, pooled, [sample.entity_embeds[i] for i in keep], sample.masks[keep],
                  sample.index, sample.prompt, prompts)


def group_by_bucket(batch):
    """Samples that can share one forward (one latent shape)."""
    groups = {}
    for sample in batch:
        groups.setdefault(bucket_key(sample), []).append(sample)
    return list(groups.values())


def stack_condition(samples, device):
    """The joint text context of samples of one bucket, their pooled vectors and the EntityCondition.

    Each row's text is ``[E1 .. Ek, G]`` then zeros up to the longest row; rows with fewer entities get
    zero-length entities with empty masks (``pad_layout``). The EntityCondition masks the padding out of
    attention (core/attention.py), so each row trains as it would alone. None instead of a condition when
    no row has entities and every prompt has one length (a plain forward)."""
    texts = [torch.cat(list(s.entity_embeds) + [s.context], dim=1) for s in samples]
    longest = max(t.shape[1] for t in texts)
    context = torch.cat([F.pad(t, (0, 0, 0, longest - t.shape[1])) for t in texts]).to(device)
    pooled = None if samples[0].pooled is None else torch.cat([s.pooled for s in samples]).to(device)
    entities = max(len(s.entity_embeds) for s in samples)
    if not entities and all(t.shape[1] == longest for t in texts):
        return context, pooled, None
    rows = [pad_layout([e.shape[1] for e in s.entity_embeds] + [s.context.shape[1]], entities) for s in samples]
    size = samples[0].masks.shape[-2:]
    masks = torch.stack([F.pad(s.masks.float(), (0, 0, 0, 0, 0, entities - len(s.masks))) if len(s.masks)
                         else s.masks.new_zeros(entities, *size) for s in samples]).to(device)
    return context, pooled, EntityCondition.for_training(rows, masks)
