"""EliGen's model patch during real sampling (comfy.sample.sample on tiny FLUX.1 / Qwen-Image models):
plain prompts unchanged, CFG and the negative branch, batches, step ranges, Qwen-Image text positions,
composition with LoRAs and other patches, and errors raised while sampling.

These tests read the mask handed to attention, which only the dense method hands over: they patch with
``attention="dense"``. tests/unit/test_entity_attention.py shows that the default (grouped) method gives
the same outputs in the same situations.
"""

import pytest
import torch

import comfy.ldm.flux.layers
import comfy.ldm.modules.attention
import comfy.samplers
import comfy.sample
import comfy.sd
from comfyui_eligen.core import conditioning, host, patch
from comfyui_eligen.core.adapters import adapter_for
from test_entity_attention import Recorder, sample_and_record
from tiny_models import TEXT_WIDTH, entities, prompts, tiny_flux, tiny_qwen_image

FAMILIES = {"flux": tiny_flux, "qwen_image": tiny_qwen_image}


def dense_patch(model):
    return patch.patch_model(model, attention="dense")


def latent(family, batch=1, hw=(8, 12)):
    return torch.zeros((batch, 16) + ((1,) if family == "qwen_image" else ()) + hw)


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_samples_plain_prompts_unchanged(family):
    model = FAMILIES[family]()
    positive, negative = prompts()
    x = latent(family, batch=2)
    plain, _ = sample_and_record(model, positive, negative, x, cfg=3.0, steps=2)
    patched, calls = sample_and_record(dense_patch(model), positive, negative, x, cfg=3.0, steps=2)
    assert torch.equal(plain, patched)
    assert all(call["mask"] is None for call in calls)


@pytest.mark.parametrize("family", FAMILIES)
def test_entities_change_the_output_and_only_the_positive_gets_the_mask(family):
    model = dense_patch(FAMILIES[family]())
    positive, negative = prompts()
    with_entities = conditioning.apply_entities(positive, entities(), negative)
    x = latent(family, batch=2)
    plain, _ = sample_and_record(model, positive, negative, x, cfg=3.0)
    out, calls = sample_and_record(model, *with_entities, x, cfg=3.0)
    assert not torch.allclose(plain, out, atol=1e-4)
    total_text = 3 + 5 + 6
    masked = [c for c in calls if c["mask"] is not None]
    unmasked = [c for c in calls if c["mask"] is None]
    assert masked and unmasked  # positive (entities) and negative (plain) ran as separate batches
    assert all(c["sequence"] == total_text + 4 * 6 for c in masked)
    assert all(c["sequence"] == 4 + 4 * 6 for c in unmasked)
    assert all(c["batch"] == 2 for c in calls)


@pytest.mark.parametrize("family", FAMILIES)
def test_entities_on_negative_copy_the_negative_into_every_slot(family):
    model = dense_patch(FAMILIES[family]())
    positive, negative = prompts(negative_length=4)
    new_positive, new_negative = conditioning.apply_entities(positive, entities(), negative, on_negative=True)
    assert new_negative[0][0].shape[1] == 3 * 4
    assert torch.equal(new_negative[0][0][:, 4:8], negative[0][0])
    _, calls = sample_and_record(model, new_positive, new_negative, latent(family), cfg=3.0)
    assert calls and all(c["mask"] is not None for c in calls)
    assert {c["sequence"] - 4 * 6 for c in calls} == {3 + 5 + 6, 4 * 3}


def test_step_range_limits_entity_control():
    model = dense_patch(tiny_flux())
    positive, negative = prompts()
    sampling = model.model.model_sampling
    steps = 6
    for start, end in [(0.0, 0.5), (0.5, 1.0)]:
        applied = conditioning.apply_entities(positive, entities(), negative, start=start, end=end)
        recorder = Recorder()
        clone = model.clone()
        clone.model_options["transformer_options"]["optimized_attention_override"] = recorder
        noise = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(0))

        comfy.sample.sample(clone, noise, steps, 1.0, "euler", "simple", applied[0], applied[1],
                            torch.zeros(1, 16, 8, 12), disable_pbar=True, seed=0)
        per_step = [recorder.calls[i * 2:(i + 1) * 2] for i in range(steps)]  # 2 attention calls a step
        active = [all(c["mask"] is not None for c in step) for step in per_step]
        sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", steps)[:-1]
        expected = [float(sampling.percent_to_sigma(end)) <= float(s) <= float(sampling.percent_to_sigma(start))
                    for s in sigmas]
        assert active == expected and any(active) and not all(active)
        # outside the range the entity tokens are gone (global prompt alone)
        assert all(step[0]["sequence"] == 6 + 24 for step, on in zip(per_step, active) if not on)


def test_qwen_image_text_positions_restart_for_every_segment():
    model = tiny_qwen_image()
    seen = []

    def recording_block(args, extra):  # installed before EliGen: EliGen's swap must wrap it
        seen.append(args["pe"])
        return extra["original_block"](args)

    model.set_model_patch_replace(recording_block, "dit", "double_block", 0)
    positive, negative = prompts(global_length=6)
    applied = conditioning.apply_entities(positive, entities(lengths=(3, 5)), negative)
    sample_and_record(dense_patch(model), *applied, latent("qwen_image", hw=(8, 12)))
    pe = seen[0]
    diffusion_model = model.model.diffusion_model
    start = max(8 // 2 // 2, 12 // 2 // 2)  # ComfyUI's text offset: max(h_tok // 2, w_tok // 2)
    text_ids = torch.cat([torch.arange(start, start + n) for n in (3, 5, 6)]).float()
    ids = torch.cat([text_ids[:, None].repeat(1, 3), torch.zeros(4 * 6, 3)])[None]
    expected = comfy.ldm.flux.layers.EmbedND(diffusion_model.pe_embedder.dim, 10000,
                                             diffusion_model.pe_embedder.axes_dim)(ids)
    # pe is [B, 1, S, ...] (0.3.75) or [B, S, 1, ...] (0.3.64): compare along its sequence axis
    pe = pe.movedim(host.models.rope_sequence_axis(pe), 1)[:, :, 0]
    expected = expected[:, 0]
    assert pe.shape[1] == 14 + 24
    torch.testing.assert_close(pe[0, :14], expected[0, :14].to(pe.dtype))
    # every segment starts at the same position (ComfyUI alone would continue the numbering)
    assert torch.equal(pe[0, 0], pe[0, 3]) and torch.equal(pe[0, 0], pe[0, 8])


def _tiny_lora(model, seed=3):
    generator = torch.Generator().manual_seed(seed)
    sd = {}
    for name in ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear2"):
        weight = model.model.diffusion_model.get_submodule(name).weight
        sd[f"diffusion_model.{name}.lora_up.weight"] = 0.5 * torch.randn(weight.shape[0], 2, generator=generator)
        sd[f"diffusion_model.{name}.lora_down.weight"] = 0.5 * torch.randn(2, weight.shape[1], generator=generator)
    return sd


def test_a_stock_lora_before_or_after_eligen_gives_the_same_result():
    model = tiny_flux()
    lora = _tiny_lora(model)
    positive, negative = prompts()
    applied = conditioning.apply_entities(positive, entities(), negative)
    x = latent("flux", batch=2)
    lora_then_eligen = dense_patch(comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)[0])
    eligen_then_lora = comfy.sd.load_lora_for_models(dense_patch(model), None, lora, 1.0, 0)[0]
    first, calls_first = sample_and_record(lora_then_eligen, *applied, x, cfg=2.0)
    second, calls_second = sample_and_record(eligen_then_lora, *applied, x, cfg=2.0)
    without_lora, _ = sample_and_record(dense_patch(model), *applied, x, cfg=2.0)
    torch.testing.assert_close(first, second)
    assert not torch.allclose(first, without_lora, atol=1e-4)
    assert any(c["mask"] is not None for c in calls_first) and any(c["mask"] is not None for c in calls_second)


def test_other_patches_added_after_eligen_compose():
    """An attention override and a block replacement set on the MODEL after EliGen Apply both still run,
    and EliGen's mask still reaches attention."""
    model = dense_patch(tiny_flux())
    recorder = Recorder()
    block_calls = []

    def block(args, extra):
        block_calls.append(1)
        return extra["original_block"](args)

    later = model.clone()
    later.model_options["transformer_options"]["optimized_attention_override"] = recorder
    later.set_model_patch_replace(block, "dit", "double_block", 0)
    positive, negative = prompts()
    applied = conditioning.apply_entities(positive, entities(), negative)
    noise = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(0))
    comfy.sample.sample(later, noise, 1, 1.0, "euler", "simple", *applied, torch.zeros(1, 16, 8, 12),
                        disable_pbar=True, seed=0)
    assert block_calls and recorder.calls and all(c["mask"] is not None for c in recorder.calls)


def test_patching_twice_adds_one_wrapper_and_changes_nothing():
    model = tiny_flux()
    once = dense_patch(model)
    twice = dense_patch(once)
    assert len(host.models.diffusion_model_wrappers(twice, patch.WRAPPER_KEY)) == 1
    positive, negative = prompts()
    applied = conditioning.apply_entities(positive, entities(), negative)
    a, _ = sample_and_record(once, *applied, latent("flux"), cfg=2.0)
    b, _ = sample_and_record(twice, *applied, latent("flux"), cfg=2.0)
    assert torch.equal(a, b)


def test_one_entity_list_works_at_two_resolutions_of_the_same_aspect():
    model = dense_patch(tiny_flux())
    positive, negative = prompts()
    applied = conditioning.apply_entities(positive, entities(mask_hw=(40, 60)), negative)
    for hw in [(8, 12), (14, 21)]:
        _, calls = sample_and_record(model, *applied, latent("flux", hw=hw))
        tokens = ((hw[0] + 1) // 2) * ((hw[1] + 1) // 2)
        assert all(c["sequence"] == 14 + tokens and c["mask"] is not None for c in calls)


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_of_another_aspect_is_an_error_naming_the_entity(family):
    model = dense_patch(FAMILIES[family]())
    positive, negative = prompts()
    applied = conditioning.apply_entities(positive, entities(mask_hw=(64, 64)), negative)
    with pytest.raises(ValueError) as error:
        sample_and_record(model, *applied, latent(family, hw=(8, 16)))
    message = str(error.value)
    assert 'entity 1 ("thing 0")' in message and "64x64" in message and "16x8" in message
    assert "aspect 1.000" in message and "aspect 2.000" in message
    assert message.startswith("EliGen Apply: the entity masks do not fit the image being sampled")
    assert "the image being sampled is 128x64 pixels (its latent is 16x8" in message


def test_near_aspect_within_one_token_is_accepted():
    model = dense_patch(tiny_flux())
    positive, negative = prompts()
    # 100x66 drawn for a 16x10 latent (8x5 tokens): off by less than one token
    applied = conditioning.apply_entities(positive, entities(mask_hw=(100, 66)), negative)
    _, calls = sample_and_record(model, *applied, latent("flux", hw=(16, 10)))
    assert calls and all(c["mask"] is not None for c in calls)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_forward_goes_through_the_same_patch(family):
    model = dense_patch(FAMILIES[family]())
    adapter = adapter_for(model)
    base_model = model.model
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn((2, 16, 8, 12), generator=generator)
    context = torch.randn(2, 3 + 5 + 6, TEXT_WIDTH, generator=generator)
    masks = conditioning.stack_masks(entities())[0][None].repeat(2, 1, 1, 1)
    condition = conditioning.EntityCondition.for_training([3, 5, 6], masks)
    recorder = Recorder()
    options = dict(host.models.sampling_transformer_options(model), optimized_attention_override=recorder)
    pooled = torch.randn(2, TEXT_WIDTH, generator=generator)
    sigma = torch.tensor([0.3, 0.8])
    out = adapter.training_forward(base_model, x_t, sigma, context, pooled, condition, options)
    plain = adapter.training_forward(base_model, x_t, sigma, context, pooled, None, options)
    assert out.shape == x_t.shape
    assert not torch.allclose(out, plain, atol=1e-5)
    assert recorder.calls and all(c["mask"] is not None for c in recorder.calls[:len(recorder.calls) // 2])


def test_training_after_sampling_in_inference_mode_still_backpropagates():
    """ComfyUI samples under inference mode; a trainer's validation run must not leave it a cached mask
    made of inference tensors (they cannot be saved for backward)."""
    model = dense_patch(tiny_qwen_image())
    positive, negative = prompts()
    chosen = entities()
    with torch.inference_mode():
        sample_and_record(model, *conditioning.apply_entities(positive, chosen, negative), latent("qwen_image"))
    adapter = adapter_for(model)
    x_t = torch.randn(1, 16, 8, 12, requires_grad=True)
    context = torch.randn(1, 3 + 5 + 6, TEXT_WIDTH)
    condition = conditioning.EntityCondition.for_training([3, 5, 6], conditioning.stack_masks(chosen)[0][None])
    def pytorch_attention(func, *args, **kwargs):  # SDPA saves its mask for backward (sub-quad does not)
        return comfy.ldm.modules.attention.attention_pytorch(*args, **kwargs)

    options = dict(host.models.sampling_transformer_options(model), optimized_attention_override=pytorch_attention)
    out = adapter.training_forward(model.model, x_t, torch.tensor([0.5]), context, None, condition, options)
    out.square().mean().backward()
    assert x_t.grad is not None and torch.isfinite(x_t.grad).all() and x_t.grad.abs().sum() > 0


def test_reference_latents_get_the_mask_on_their_own_grid():
    """FLUX Kontext / Qwen-Image edit append reference-image tokens; as in the reference, the entity mask
    covers them too (tiled: the same mask brought to each reference latent's grid)."""
    from comfyui_eligen.core.attention import mask_to_token_grid

    model = dense_patch(tiny_flux())
    positive, negative = prompts()
    positive[0][1]["reference_latents"] = [torch.randn(1, 16, 4, 6)]
    chosen = entities()
    applied = conditioning.apply_entities(positive, chosen, negative)
    _, calls = sample_and_record(model, *applied, latent("flux", hw=(8, 12)))
    text, main_tokens, ref_tokens = 3 + 5 + 6, 4 * 6, 2 * 3
    assert calls and all(c["sequence"] == text + main_tokens + ref_tokens for c in calls)
    allowed = calls[0]["mask"][0, 0] == 0
    masks, _ = conditioning.stack_masks(chosen)
    for k, row in enumerate((0, 3)):  # first text row of each entity
        expected = torch.cat([mask_to_token_grid(masks[k], (8, 12)).flatten(), mask_to_token_grid(masks[k], (4, 6)).flatten()])
        assert torch.equal(allowed[row, text:], expected)
