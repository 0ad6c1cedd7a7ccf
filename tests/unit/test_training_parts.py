"""Plain-function tests of the trainer's parts: out-of-place blocks, loss and timestep samplers, LoRA
injection/removal, checkpoint files."""

import functools
import json
import os

import pytest
import torch

import comfy.model_management
import comfy.model_patcher
import comfy.sd
from comfyui_eligen.core import blocks
from comfyui_eligen.core.adapters import adapter_for
from comfyui_eligen.core.adapters.flux import FluxAdapter
from comfyui_eligen.core.adapters.qwen_image import QwenImageAdapter
from comfyui_eligen.core.lora_formats import stock_unmatched_keys, model_key_map
from comfyui_eligen.toyworld.models import build_diffusion_model, init_weights
from comfyui_eligen.training import checkpoints, lora, loss

FAMILIES = ("flux", "qwen_image")



@functools.lru_cache(maxsize=None)
def tiny(family, dtype=torch.float64, seed=0):
    """A tiny model shared by the tests of this file: tests must leave it as they found it."""
    base = build_diffusion_model(family, dtype)
    init_weights(base.diffusion_model, seed)
    return base


def inputs(family, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (2, 16, 8, 8) if family == "flux" else (2, 16, 1, 8, 8)
    x = torch.randn(shape, generator=g, dtype=dtype)
    context = torch.randn(2, 5, 64, generator=g, dtype=dtype)
    t = torch.rand(2, generator=g, dtype=dtype)
    kwargs = {"y": torch.randn(2, 64, generator=g, dtype=dtype)} if family == "flux" else {}
    return x, t, context, kwargs


# ---------------------------------------------------------------------------------------------------
# core/blocks.py


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_blocks_match_stock_blocks(family, checkpointing):
    base = tiny(family)
    model = base.diffusion_model
    x, t, context, kwargs = inputs(family)
    reference = model(x.clone(), t, context, transformer_options={}, **kwargs)
    options = blocks.training_transformer_options(model, adapter_for(base).training_blocks, {}, checkpointing)
    assert len(options["patches_replace"]["dit"]) == sum(
        len(getattr(model, attr)) for attr, _ in adapter_for(base).training_blocks.values())
    out = model(x.clone(), t, context, transformer_options=options, **kwargs)
    # FLUX's stock rope runs in float32; ours keeps float64, hence the small difference there.
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)


def test_flux_training_blocks_leave_inputs_untouched_and_backprop():
    base = tiny("flux")
    model = base.diffusion_model
    img = torch.randn(1, 16, 128, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(1, 5, 128, dtype=torch.float64, requires_grad=True)
    vec = torch.randn(1, 128, dtype=torch.float64)
    ids = torch.zeros(1, 21, 3)
    ids[:, 5:, 1] = torch.arange(16) // 4
    ids[:, 5:, 2] = torch.arange(16) % 4
    pe = model.pe_embedder(ids)
    img_before, txt_before = img.detach().clone(), txt.detach().clone()
    new_img, new_txt = blocks.flux_double_block(model.double_blocks[0], img, txt, vec, pe, transformer_options={})
    joint = blocks.flux_single_block(model.single_blocks[0], torch.cat([new_txt, new_img], 1), vec, pe,
                                     transformer_options={})
    joint.square().sum().backward()  # the stock blocks raise "modified by an inplace operation" here
    assert torch.equal(img.detach(), img_before) and torch.equal(txt.detach(), txt_before)
    assert img.grad is not None and torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
    # Same values as the stock (in-place) blocks on copies.
    with torch.no_grad():
        ref_img, ref_txt = model.double_blocks[0](img=img_before.clone(), txt=txt_before.clone(), vec=vec, pe=pe)
        ref_joint = model.single_blocks[0](torch.cat([ref_txt, ref_img], 1), vec=vec, pe=pe)
    torch.testing.assert_close(joint.detach(), ref_joint, rtol=1e-6, atol=1e-6)


def test_training_replacement_wraps_an_existing_replacement():
    """An existing ("double_block", i) replacement (like the Qwen-Image pe swap) still runs, and gets the
    out-of-place block as its original_block."""
    base = tiny("flux")
    model = base.diffusion_model
    x, t, context, kwargs = inputs("flux")
    seen = []

    def existing(args, extra):
        seen.append(extra["original_block"])
        out = extra["original_block"](args)
        return {"img": out["img"] * 0.5, "txt": out["txt"]}

    options = {"patches_replace": {"dit": {("double_block", 0): existing}}}
    reference = model(x.clone(), t, context, transformer_options=options, **kwargs)
    trained = blocks.training_transformer_options(model, blocks.FLUX_TRAINING_BLOCKS, options, True)
    assert options["patches_replace"]["dit"] == {("double_block", 0): existing}  # input not modified
    out = model(x.clone(), t, context, transformer_options=trained, **kwargs)
    assert len(seen) == 2 and seen[1].__qualname__.startswith("_flux_double_replacement")
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# training/loss.py


def test_reference_schedules():
    flux = loss.reference_sigmas(FluxAdapter.reference_schedule)
    s = torch.linspace(1.0, 0.003 / 1.002, 1000, dtype=torch.float64)
    assert len(flux) == 1000 and flux[0] == pytest.approx(1.0)
    assert flux[500].item() == pytest.approx((3 * s[500] / (1 + 2 * s[500])).item())
    assert (flux[1:] < flux[:-1]).all()
    qwen = loss.reference_sigmas(QwenImageAdapter.reference_schedule)
    assert len(qwen) == 1000 and qwen[0] == pytest.approx(1.0) and qwen[-1] == pytest.approx(0.02)
    assert (qwen[1:] < qwen[:-1]).all()
    for sigmas in (flux, qwen):
        weights = loss.reference_weights(sigmas)
        assert weights.mean().item() == pytest.approx(1.0) and weights.min().item() == pytest.approx(0.0)
        # The bump is over the shifted timestep 1000 * sigma: its peak is where sigma is nearest 0.5.
        assert weights.argmax().item() == (sigmas - 0.5).abs().argmin().item()
    with pytest.raises(ValueError, match="sdxl"):
        loss.reference_sigmas({"kind": "sdxl"})


@pytest.mark.parametrize("kind", loss.TIMESTEP_SAMPLERS)
def test_timestep_samplers_are_seeded(kind):
    sampler = loss.TimestepSampler(kind, schedule=FluxAdapter.reference_schedule)
    a = sampler(64, torch.Generator().manual_seed(3))
    b = sampler(64, torch.Generator().manual_seed(3))
    c = sampler(64, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert ((a[0] >= 0) & (a[0] <= 1)).all() and (a[1] >= 0).all()
    if kind == "reference":
        assert set(a[0].tolist()) <= set(sampler.sigmas.tolist())
        assert not torch.equal(a[1], torch.ones(64))
    with pytest.raises(ValueError, match="timestep sampling 'sometimes'"):
        loss.TimestepSampler("sometimes")


def test_flow_matching_loss_and_region_weight():
    x0 = torch.randn(2, 16, 4, 4)
    noise = torch.randn(2, 16, 4, 4)
    sigma = torch.tensor([0.25, 0.75])
    x_t = loss.noisy_latent(x0, noise, sigma)
    torch.testing.assert_close(x_t[1], 0.25 * x0[1] + 0.75 * noise[1])
    target = loss.velocity_target(x0, noise)
    assert loss.flow_matching_loss(target, target, torch.ones(2)).item() == 0.0
    prediction = target + 1.0
    assert loss.flow_matching_loss(prediction, target, torch.tensor([1.0, 3.0])).item() == pytest.approx(2.0)
    masks = torch.zeros(2, 2, 32, 32)
    masks[:, 0, :16, :16] = 1  # top-left quarter
    weight = loss.entity_region_weight(masks, (4, 4), 3.0)
    assert weight.shape == (2, 1, 4, 4)
    assert weight[0, 0, :2, :2].eq(4).all() and weight[0, 0, 2:].eq(1).all()
    error = torch.zeros_like(target)
    error[:, :, 0, 0] = 1.0  # an error inside the entity counts more than the same error outside
    inside = loss.flow_matching_loss(target + error, target, torch.ones(2), weight)
    outside = loss.flow_matching_loss(target + error.flip(-1, -2), target, torch.ones(2), weight)
    assert inside > outside


# ---------------------------------------------------------------------------------------------------
# training/lora.py


def patcher(base):
    return comfy.model_patcher.ModelPatcher(base, comfy.model_management.get_torch_device(),
                                            comfy.model_management.unet_offload_device())


@pytest.mark.parametrize("family", FAMILIES)
def test_inject_and_remove_leave_the_model_as_it_was(family):
    base = tiny(family, torch.float32)
    model = base.diffusion_model
    adapter = adapter_for(base)
    model.img_in.weight.requires_grad_(True)  # a flag that must survive
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x, t, context, kwargs = inputs(family, torch.float32)
    before = model(x, t, context, **kwargs)
    expected = lora.matching_linears(model, adapter.LORA_TARGETS["eligen"])
    names = lora.inject(model, lora.LoraSettings(rank=4, alpha=8, init="gaussian"), adapter)
    assert names and names == expected
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    assert all(p.dtype == torch.float32 for p in lora.lora_parameters(model))
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.inject(model, lora.LoraSettings(rank=4), adapter)
    state = lora.lora_state_dict(model)
    assert len(state) == 3 * len(names)
    lora.remove(model)
    # The file loads with the stock loader, every key matched (key map of the restored model).
    assert stock_unmatched_keys(state, model_key_map(patcher(base))) == []
    assert not lora.lora_layers(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert "peft_config" not in vars(model)
    torch.testing.assert_close(model(x, t, context, **kwargs), before, rtol=0, atol=0)


def test_presets_and_custom_patterns():
    base = tiny("flux", torch.float32)
    model, adapter = base.diffusion_model, adapter_for(base)
    eligen = lora.matching_linears(model, adapter.LORA_TARGETS["eligen"])
    assert len(eligen) == 2 * 10 + 2 * 3  # 2 double blocks x 10 targets, 2 single blocks x 3
    every = lora.matching_linears(model, lora.target_patterns(lora.LoraSettings(preset="all_block_linears"), adapter))
    assert set(eligen) <= set(every) and not any(n.startswith(("img_in", "final_layer")) for n in every)
    custom = lora.LoraSettings(preset="custom", custom_pattern=r"single_blocks\.0\.linear2")
    assert lora.inject(model, custom, adapter) == ["single_blocks.0.linear2"]
    lora.remove(model)


@pytest.mark.parametrize("settings, message", [
    (dict(preset="custom", custom_pattern="double_blocks\\.(("), "custom_pattern .* is not a valid regex"),
    (dict(preset="custom", custom_pattern=""), "preset 'custom' needs a custom_pattern"),
    (dict(preset="custom", custom_pattern="nothing_here"), "matches no Linear module"),
    (dict(preset="everything"), "preset 'everything' is not one of eligen"),
    (dict(rank=0), "rank must be at least 1"),
    (dict(alpha=-1.0), "alpha must be a positive finite number"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(init="pissa"), "init 'pissa' is not one of"),
    (dict(dtype="int8"), "dtype 'int8' is not one of"),
])
def test_bad_lora_settings_are_named(settings, message):
    base = tiny("flux", torch.float32)
    with pytest.raises(ValueError, match=message):
        lora.inject(base.diffusion_model, lora.LoraSettings(**settings), adapter_for(base))
    assert not lora.lora_layers(base.diffusion_model)


# ---------------------------------------------------------------------------------------------------
# training/checkpoints.py


def _optimizer_with_state():
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    for _ in range(2):
        sum(p.square().sum() for p in params).backward()
        optimizer.step()
        scheduler.step()
    return params, optimizer, scheduler


def test_checkpoint_round_trip(tmp_path):
    params, optimizer, scheduler = _optimizer_with_state()
    tensors = {"a.lora_A": params[0].detach(), "a.lora_B": params[1].detach()}
    for step in (1, 2, 3, 4):
        path = checkpoints.save_checkpoint(str(tmp_path), step, tensors, optimizer, scheduler,
                                           {"family": "flux", "losses": [[1, 0.5]]}, keep_last=2)
    assert os.path.basename(path) == "step_000004.safetensors"
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors")) == [
        "step_000003.safetensors", "step_000004.safetensors"]
    assert checkpoints.latest_checkpoint(str(tmp_path)) == path
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]

    loaded = checkpoints.Checkpoint(path)
    assert loaded.step == 4 and loaded.info["losses"] == [[1, 0.5]]
    assert all(torch.equal(loaded.lora[k], tensors[k]) for k in tensors)
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh_optimizer = torch.optim.AdamW(fresh, lr=0.1, weight_decay=0.01)
    fresh_scheduler = torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, lambda s: 1.0 / (s + 1))
    loaded.restore_optimizer(fresh_optimizer)
    loaded.restore_scheduler(fresh_scheduler)
    assert fresh_scheduler.last_epoch == scheduler.last_epoch
    assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    for p, q in zip(params, fresh):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[p][key], fresh_optimizer.state[q][key])


def test_checkpoint_errors_are_clear(tmp_path):
    assert checkpoints.latest_checkpoint(str(tmp_path)) is None
    with pytest.raises(ValueError, match="is not of the form step_"):
        checkpoints.resolve_checkpoint(str(tmp_path), "../../etc/passwd")
    with pytest.raises(ValueError, match="step_000009.safetensors does not exist"):
        checkpoints.resolve_checkpoint(str(tmp_path), "step_000009.safetensors")
    (tmp_path / checkpoints.POINTER).write_text("{not json")
    with pytest.raises(ValueError, match="pointer .* is damaged"):
        checkpoints.latest_checkpoint(str(tmp_path))
    bad = tmp_path / "step_000001.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot be read"):
        checkpoints.Checkpoint(str(bad))
    (tmp_path / checkpoints.POINTER).write_text(json.dumps({"checkpoint": "step_000001.safetensors"}))
    with pytest.raises(ValueError, match="cannot be read"):
        checkpoints.Checkpoint(checkpoints.latest_checkpoint(str(tmp_path)))
