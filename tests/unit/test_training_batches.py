"""Training micro-batches: any samples of an aspect bucket share one forward, every micro-batch is full
(so every rank always trains its share), and a step's gradient does not depend on how its micro-batches
are split over ranks.

float64, both families: in a batch of samples with different entity counts (0 to 3) and prompt lengths,
each sample's prediction, loss and LoRA gradients equal those of the sample trained alone (no padding).
"""

import pytest
import torch

from comfyui_eligen.training import lora
from comfyui_eligen.training.batching import BatchStream, bucket_key, epoch_batches, micro_batch, stack_condition
from comfyui_eligen.training.loop import GradientSum
from comfyui_eligen.training.loss import TimestepSampler
from comfyui_eligen.training.model import TrainingModel, sample_losses
from comfyui_eligen.training.sample import Sample
from comfyui_eligen.training.settings import TrainSettings
from test_training_gradients import model_for, randomise_lora
from tiny_models import TEXT_WIDTH

# (entity text lengths, global prompt length) per sample
LAYOUTS = [([3], 4), ([], 6), ([2, 5, 1], 3), ([4, 4], 5)]
EPS = torch.finfo(torch.float64).eps


def mixed_samples(family, layouts=LAYOUTS, seed=0, latent_hw=(8, 6)):
    g = torch.Generator().manual_seed(seed)
    frames = (1,) if family == "qwen_image" else ()
    h, w = latent_hw
    samples = []
    for lengths, global_length in layouts:
        masks = torch.zeros(len(lengths), 8 * h, 8 * w)
        for k in range(len(lengths)):  # overlapping boxes, one per entity
            top, left = (7 * k) % (4 * h), (11 * k) % (4 * w)
            masks[k, top:top + 5 * h, left:left + 5 * w] = 1
        samples.append(Sample(
            latent=torch.randn((16,) + frames + latent_hw, generator=g, dtype=torch.float64),
            context=torch.randn(1, global_length, TEXT_WIDTH, generator=g, dtype=torch.float64),
            pooled=torch.randn(1, TEXT_WIDTH, generator=g, dtype=torch.float64) if family == "flux" else None,
            entity_embeds=[torch.randn(1, n, TEXT_WIDTH, generator=g, dtype=torch.float64) for n in lengths],
            masks=masks,
        ))
    return samples


def generators(count):
    return [torch.Generator().manual_seed(100 + i) for i in range(count)]


@pytest.mark.parametrize("family", ["flux", "qwen_image"])
def test_each_sample_of_a_mixed_batch_trains_as_it_would_alone(family):
    samples = mixed_samples(family)
    settings = TrainSettings(precision="fp32", entity_weight=1.0, timestep_sampling="reference")
    sampler = TimestepSampler("reference", schedule={"kind": "linear", "shift": 3.0, "sigma_min": 0.003})
    lora_settings = lora.LoraSettings(rank=2, alpha=3.0, preset="eligen")
    with torch.inference_mode(False), TrainingModel(model_for(family), lora_settings) as model:
        randomise_lora(model, seed=1)
        params = list(lora.named_lora_parameters(model.diffusion_model).values())

        def gradient(loss):
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])

        together = sample_losses(model, samples, sampler, settings, generators(len(samples)))
        context, pooled, condition = stack_condition(samples, model.device)
        assert condition.segment_lengths is None and context.shape[1] == 13  # padded: 4 layouts in one forward
        x = torch.stack([s.latent for s in samples])
        sigma = torch.linspace(0.2, 0.9, len(samples), dtype=torch.float64)
        predicted = model.velocity(x, sigma, context, pooled, condition)
        for index, sample in enumerate(samples):
            alone = sample_losses(model, [sample], sampler, settings, generators(len(samples))[index:index + 1])
            assert abs(together[index].item() - alone.item()) <= 64 * EPS * abs(alone.item()), (index, LAYOUTS[index])
            expected, got = gradient(alone[0]), gradient(together[index])
            assert expected.abs().max() > 0
            assert (got - expected).abs().max().item() <= 1e4 * EPS * expected.abs().max().item(), (index, LAYOUTS[index])
            one = stack_condition([sample], model.device)
            single = model.velocity(x[index:index + 1], sigma[index:index + 1], *one)
            assert (predicted[index] - single[0]).abs().max().item() <= 1e3 * EPS * single.abs().max().item()


def test_every_micro_batch_is_full_and_of_one_bucket():
    """Buckets of 5, 2 and 1 samples, micro-batches of 4 (e.g. 2 ranks x batch 2): every micro-batch
    holds 4 samples of one latent shape, every sample trains in every epoch, and rank r always gets
    slots [2r, 2r + 2)."""
    shapes = [(16, 8, 6)] * 5 + [(16, 6, 8)] * 2 + [(16, 8, 8)]
    samples = [Sample(torch.zeros(shape), torch.zeros(1, 2, 4), None, [], torch.zeros(0, 64, 48), index=i)
               for i, shape in enumerate(shapes)]
    for epoch in range(3):
        batches = epoch_batches(samples, 4, seed=1, epoch=epoch)
        assert len(batches) == 2 + 1 + 1
        assert all(len(b) == 4 and len({bucket_key(samples[i]) for i in b}) == 1 for b in batches)
        assert {i for b in batches for i in b} == set(range(len(samples)))
    assert epoch_batches(samples, 4, 1, 0) != epoch_batches(samples, 4, 1, 1)  # reshuffled per epoch
    stream = BatchStream(samples, 4, seed=1)
    settings = TrainSettings(batch_size=2, grad_accumulation=2, seed=1)
    for step in range(5):
        for micro in range(2):
            whole = stream.batch(step * 2 + micro)
            shares = [micro_batch(stream, settings, step, micro, rank, None) for rank in (0, 1)]
            assert [s.index for share in shares for s in share.samples] == [s.index for s in whole]
            assert all(share.whole == 4 and len(share.samples) == 2 for share in shares)


def test_the_step_gradient_sum_does_not_depend_on_how_micro_batches_and_ranks_split_it():
    """float32 gradients of 4 micro-batches: summed by GradientSum (float64) per rank, then over ranks in
    float64 (as Group.reduce_step), 1, 2 or 4 ranks and any assignment give the same float32 gradient,
    bit for bit. Plain float32 addition in two of those orders does not."""
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(4096, generator=g) * 10.0 ** torch.randint(-3, 3, (4096,), generator=g) for _ in range(4)]
    param = torch.nn.Parameter(torch.zeros(4096))

    def step_gradient(ranks):
        total = None
        for micro_batches in ranks:
            rank = GradientSum([param])
            for index in micro_batches:
                param.grad = parts[index].clone()
                rank.add()
            total = rank if total is None else total
            if rank is not total:
                total.total, total.seen = total.total + rank.total, total.seen | rank.seen
        total.apply()
        return param.grad.clone()

    one = step_gradient([[0, 1, 2, 3]])
    for ranks in ([[0, 1], [2, 3]], [[0, 2], [1, 3]], [[3], [1], [0], [2]]):
        assert torch.equal(step_gradient(ranks), one), ranks
    assert not torch.equal((parts[0] + parts[1]) + (parts[2] + parts[3]), (parts[0] + parts[2]) + (parts[1] + parts[3]))
