"""max_vram_gb = 0 (the default) is automatic: on CUDA what the card has minus a 1 GiB reserve, no limit on
the CPU. A 12 GB and a 16 GB card are faked where the device's memory is read (offload.device_memory) and
the trainer (TrainingModel, full-size FLUX.1 with an fp8 base on the meta device) plans and logs as it
would on them; nothing touches a GPU. The plan is made before the LoRA is injected, from what injection
will add."""

import logging
import types

import pytest
import torch

from comfyui_eligen.core.adapters import adapter_for
from comfyui_eligen.training import lora, offload
from comfyui_eligen.training.model import TrainingModel

from test_bench_memory import bench_module
from test_training_loop import samples_for
from tiny_models import tiny_flux

GIB = 2 ** 30


@pytest.fixture(scope="module")
def flux_fp8():
    """Full-size FLUX.1 (19 + 38 blocks) with fp8 weights on the meta device, and the memory benchmark's
    samples (1024 px, 4 entities)."""
    bench = bench_module()
    opts = bench.parser().parse_args(["--device", "cpu"])
    return bench.meta_model(opts, "flux", "fp8"), bench.samples(opts, "flux")


def fake_card(monkeypatch, gib, name="Fake GPU"):
    monkeypatch.setattr(offload, "device_memory", lambda device: (int(gib * GIB), f"{name} ({device})"))


def on_cuda(base, samples, max_vram_gb=0.0):
    """The trainer's model for ``base`` with CUDA as its load device (only planned, never loaded)."""
    import comfy.model_patcher

    patcher = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cuda", 0),
                                               offload_device=torch.device("cpu"))
    request = offload.MemoryRequest(max_vram_gb=max_vram_gb, samples=samples, batch_size=1,
                                    autocast_dtype=torch.bfloat16)
    return TrainingModel(patcher, lora.LoraSettings(rank=16, alpha=16.0), gradient_checkpointing=True, memory=request)


def memory_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("EliGen training: max_vram_gb")]


def test_a_12_and_a_16_gb_card_get_a_plan_without_setting_anything(flux_fp8, monkeypatch, caplog):
    base, samples = flux_fp8
    counts = {}
    for card in (12, 16):
        fake_card(monkeypatch, card, f"Fake {card} GB card")
        caplog.clear()
        with caplog.at_level(logging.INFO):
            model = on_cuda(base, samples)
        plan, estimate = model.memory_plan, model.memory_plan.estimate
        assert plan.budget_bytes == (card - 1) * GIB
        assert plan.fits and 0 < plan.count < plan.total_blocks == 57
        # the fewest blocks that fit: one fewer would not
        previous = offload.spread(plan.count - 1, plan.total_blocks)
        assert estimate.device_bytes(plan.positions) <= plan.budget_bytes < estimate.device_bytes(previous)
        assert model.offload is not None and model.offload.plan is plan  # it trains through block swap
        [line] = memory_lines(caplog)
        assert line.startswith(
            f"EliGen training: max_vram_gb automatic: Fake {card} GB card (cuda:0) has {card}.00 GiB; keeping 1.00 GiB "
            f"free for the CUDA context and the display leaves a budget of {card - 1}.00 GiB; block swap: "
            f"{plan.count} of 57 blocks kept in CPU memory")
        assert f"<= budget {card - 1}.00 GiB" in line
        counts[card] = plan.count
    assert counts[16] < counts[12]


def test_a_card_with_room_trains_the_usual_way(flux_fp8, monkeypatch, caplog):
    base, samples = flux_fp8
    fake_card(monkeypatch, 141)
    with caplog.at_level(logging.INFO):
        model = on_cuda(base, samples)
    assert model.memory_plan.count == 0 and model.memory_plan.fits
    assert model.offload is None  # no block swap: loaded by ComfyUI's model management as without a budget
    [line] = memory_lines(caplog)
    assert "has 141.00 GiB" in line and "block swap: 0 of 57 blocks" in line


def test_a_number_overrides_the_card(flux_fp8, monkeypatch, caplog):
    base, samples = flux_fp8
    fake_card(monkeypatch, 141)
    with caplog.at_level(logging.INFO):
        model = on_cuda(base, samples, max_vram_gb=11)
    fake_card(monkeypatch, 12)
    automatic = on_cuda(base, samples)
    assert model.memory_plan.budget_bytes == 11 * GIB
    assert model.memory_plan.positions == automatic.memory_plan.positions  # the same budget as a 12 GB card
    [line] = memory_lines(caplog)
    assert line.startswith("EliGen training: max_vram_gb = 11 GiB; block swap:")


def test_no_limit_on_the_cpu(caplog):
    base = tiny_flux(seed=0, depth=1, single_depth=1)
    with caplog.at_level(logging.INFO):
        model = TrainingModel(base, lora.LoraSettings(rank=2), memory=offload.MemoryRequest(samples=samples_for("flux")))
    assert model.memory_plan is None and model.offload is None
    assert memory_lines(caplog) == ["EliGen training: max_vram_gb automatic: no limit on the cpu device (a budget "
                                    "applies on CUDA only)."]


def test_no_automatic_limit_under_fsdp():
    budget = offload.memory_budget(0.0, "cuda:0", sharded=True)
    assert budget.bytes is None and "FSDP" in budget.reason
    assert offload.memory_budget(9.5, "cuda:0", sharded=True).bytes == int(9.5 * GIB)


def test_the_device_reading_follows_a_process_memory_fraction(monkeypatch):
    properties = types.SimpleNamespace(total_memory=80 * GIB, name="Fake 80 GB card")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: properties)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 0.15, raising=False)
    usable, name = offload.device_memory("cuda:0")
    assert usable == int(80 * GIB * 0.15) and "0.150 of its 80.00 GiB" in name
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 1.0, raising=False)
    assert offload.device_memory("cuda:0") == (80 * GIB, "Fake 80 GB card (cuda:0)")


def test_the_plan_before_loading_counts_what_injection_adds():
    base = tiny_flux(seed=0, depth=2, single_depth=2)
    diffusion_model, adapter = base.model.diffusion_model, adapter_for(base)
    settings = lora.LoraSettings(rank=3, preset="eligen")
    count = lora.parameter_count(diffusion_model, settings, adapter)
    blocks = [block for _, _, block in offload.ordered_blocks(diffusion_model, adapter.training_blocks)]
    before = [offload.module_bytes(block) for block in blocks], offload.module_bytes(diffusion_model)
    lora.inject(diffusion_model, settings, adapter)
    try:
        injected = lora.lora_parameters(diffusion_model)
        assert count == sum(p.numel() for p in injected) > 0
        ids = {id(p) for p in injected}

        def frozen(module):
            return sum(offload.tensor_bytes(getattr(owner, kind)[name])
                       for owner, kind, name in offload.frozen_slots(module, ids))
        assert ([frozen(block) for block in blocks], frozen(diffusion_model)) == before
    finally:
        lora.remove(diffusion_model)
