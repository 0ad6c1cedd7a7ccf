"""Block swap (training/offload.py): the same training with blocks swapped out of the device and
without, bit for bit; a missed swap-in fails; LoRA tensors never move; swap order under checkpointing;
the planner's choice from a memory budget."""

import logging

import pytest
import torch

from comfyui_eligen.training import lora, offload
from comfyui_eligen.training.batching import stack_condition
from comfyui_eligen.training.loop import TrainingData, train
from comfyui_eligen.training.model import TrainingModel
from comfyui_eligen.training.settings import TrainSettings

from test_training_loop import samples_for
from tiny_models import tiny_flux, tiny_qwen_image

LORA = lora.LoraSettings(rank=2, alpha=2, dropout=0.1, preset="eligen")
SETTINGS = dict(steps=3, batch_size=2, learning_rate=1e-2, entity_dropout=0.3, seed=3)
MODELS = {"flux": lambda: tiny_flux(seed=1, depth=2, single_depth=2),
          "qwen_image": lambda: tiny_qwen_image(seed=1, layers=3)}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("family", ["flux", "qwen_image"])
def test_block_swap_is_bit_identical(family, checkpointing):
    base = MODELS[family]()
    samples = samples_for(family)
    plain = train(base, TrainingData(samples), LORA, TrainSettings(gradient_checkpointing=checkpointing, **SETTINGS))
    swapped = train(base, TrainingData(samples), LORA, TrainSettings(gradient_checkpointing=checkpointing, blocks_to_swap=2,
                                                       **SETTINGS))
    assert [loss for _, loss in swapped.losses] == [loss for _, loss in plain.losses]
    assert swapped.lora.keys() == plain.lora.keys()
    for key in plain.lora:
        assert torch.equal(swapped.lora[key], plain.lora[key]), key
    assert any(plain.lora[k].abs().max() > 0 for k in plain.lora if k.endswith("lora_up.weight"))


def swap_model(family, count, checkpointing):
    base = MODELS[family]()
    samples = samples_for(family)
    request = offload.MemoryRequest(blocks_to_swap=count, samples=samples, batch_size=2)
    model = TrainingModel(base, LORA, checkpointing, seed=0, memory=request)
    model.offload.record = True
    return model, samples


def one_loss(model, samples):
    """The squared velocity of one sample at a fixed noise level: a loss that reaches every block."""
    context, pooled, condition = stack_condition(samples[:1], model.device)
    dtype = model.compute_dtype
    x = samples[0].latent[None].to(model.device, dtype)
    sigma = torch.tensor([0.6], device=model.device)
    velocity = model.velocity(x, sigma, context.to(dtype), None if pooled is None else pooled.to(dtype), condition)
    return velocity.float().square().mean()


@pytest.mark.parametrize("family", ["flux", "qwen_image"])
def test_a_block_left_swapped_out_fails(family):
    """The placeholders are real: running the model without the swap wrapper (plain stock blocks) errors."""
    model, samples = swap_model(family, count=1, checkpointing=False)
    with torch.inference_mode(False), model:
        position = model.offload.plan.positions[0]
        block = offload.ordered_blocks(model.diffusion_model, model.adapter.training_blocks)[position][2]
        weights = [p for n, p in block.named_parameters() if n.endswith("weight") and not p.requires_grad]
        assert weights and all(p.numel() == 0 for p in weights)  # swapped out between runs
        model._options = dict(model.patched.model_options.get("transformer_options", {}))  # no swap-in
        with pytest.raises(RuntimeError):
            one_loss(model, samples)
    # after the run the shared model has its weights back
    assert all(p.numel() > 0 for p in block.parameters())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_swap_order_and_lora_tensors_stay(checkpointing):
    model, samples = swap_model("qwen_image", count=2, checkpointing=checkpointing)
    with torch.inference_mode(False), model:
        positions = model.offload.plan.positions
        assert positions == [0, 2]  # evenly spread over the 3 blocks
        before = {id(p): (p.data_ptr(), p.device) for p in model.parameters}
        slots = [s for slots in model.offload.swapper.slots.values() for s in slots]
        assert slots and not any(id(s.original) in before for s in slots)  # LoRA tensors are never swapped
        loss = one_loss(model, samples)
        loss.backward()
        events = model.offload.swapper.events
        # forward: ascending, each block in then out, the next one prefetched while one runs, and the last
        # one again for backward; backward (recomputation): descending, prefetching the previous block
        forward = [(kind, pos) for kind, pos, direction in events if direction == "forward"]
        backward = [(kind, pos) for kind, pos, direction in events if direction == "backward"]
        assert forward == [("in", 0), ("prefetch", 2), ("out", 0), ("in", 2), ("out", 2), ("prefetch", 2)]
        assert backward == [("in", 2), ("prefetch", 0), ("out", 2), ("in", 0), ("out", 0)]
        grads = [p.grad for p in model.parameters if p.grad is not None]  # the last block's text side has none
        assert len(grads) > len(model.parameters) // 2 and all(torch.isfinite(g).all() for g in grads)
        assert {id(p): (p.data_ptr(), p.device) for p in model.parameters} == before
        assert all(p.device == model.device for p in model.parameters)


def test_budget_chooses_the_fewest_blocks_and_logs_why(caplog):
    estimate = offload.MemoryEstimate(block_bytes=[100] * 10, other_bytes=50, lora_bytes=10, unit_bytes=1,
                                      mask_bytes=0, cast_bytes=0, checkpointing=True)
    fixed = estimate.device_bytes([])
    # each swapped block saves 100 bytes, minus 2 blocks of buffers once anything is swapped
    budget = fixed - 500
    plan = offload.plan_block_swap(estimate, budget)
    assert plan.count == 7 and plan.fits and plan.positions == offload.spread(7, 10)
    assert estimate.device_bytes(plan.positions) <= budget < estimate.device_bytes(offload.spread(6, 10))
    assert offload.plan_block_swap(estimate, None).count == 0
    too_small = offload.plan_block_swap(estimate, 10)
    assert too_small.count == 10 and not too_small.fits and "even with every block swapped" in too_small.reason
    assert offload.plan_block_swap(estimate, budget, fixed_count=3).count == 3

    # through the trainer: a budget below the tiny model's size swaps blocks, and the log says so
    caplog.set_level(logging.INFO)
    base, samples = MODELS["flux"](), samples_for("flux")
    result = train(base, TrainingData(samples), LORA, TrainSettings(steps=1, max_vram_gb=1e-6))
    assert result.step == 1
    lines = [r.getMessage() for r in caplog.records if "block swap:" in r.getMessage()]
    assert lines and "4 of 4 blocks kept in CPU memory" in lines[0] and "budget" in lines[0]
