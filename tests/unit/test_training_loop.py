"""The training loop as a plain function: exact resume, interrupt, NaN stop, the shared MODEL left
unmodified, validation images, settings errors."""

import math
import os
import re

import pytest
import torch

from comfyui_eligen.training import checkpoints, lora
from comfyui_eligen.training.hooks import Hooks
from comfyui_eligen.training.loop import CheckpointFolder, TrainingData, TrainingStopped, train
from comfyui_eligen.training.sample import Sample
from comfyui_eligen.training.settings import TrainSettings, lr_lambda

from tiny_models import TEXT_WIDTH, tiny_flux, tiny_qwen_image



def samples_for(family, count=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    latent_shape = (16, 8, 8) if family == "flux" else (16, 1, 8, 8)
    out = []
    for i in range(count):
        masks = torch.zeros(1 + i % 2, 64, 64)
        masks[0, :32, :] = 1
        if len(masks) > 1:
            masks[1, 32:, 32:] = 1
        out.append(Sample(
            latent=torch.randn(latent_shape, generator=g),
            context=torch.randn(1, 4, TEXT_WIDTH, generator=g),
            pooled=torch.randn(1, TEXT_WIDTH, generator=g) if family == "flux" else None,
            entity_embeds=[torch.randn(1, 2 + k, TEXT_WIDTH, generator=g) for k in range(len(masks))],
            masks=masks,
        ))
    return out


# Every random feature on, so exact resume covers them all.
RANDOM_SETTINGS = dict(batch_size=2, grad_accumulation=2, schedule="cosine", warmup_steps=2, learning_rate=1e-2,
                       timestep_sampling="reference", entity_weight=1.0, entity_dropout=0.3, caption_dropout=0.3,
                       seed=5)
LORA = lora.LoraSettings(rank=2, alpha=2, dropout=0.1, preset="eligen")


class StopAfter:
    """check_cancel that raises on its n-th call (like ComfyUI's interrupt)."""

    def __init__(self, calls):
        self.calls = calls

    def __call__(self):
        self.calls -= 1
        if self.calls < 0:
            raise KeyboardInterrupt("stop requested")


@pytest.mark.parametrize("family, model", [("flux", tiny_flux), ("qwen_image", tiny_qwen_image)])
def test_resume_is_exact(tmp_path, family, model):
    base = model(seed=1)
    samples = samples_for(family)
    settings = TrainSettings(steps=5, **RANDOM_SETTINGS)
    whole = train(base, TrainingData(samples), LORA, settings, CheckpointFolder(str(tmp_path / "whole")))
    assert whole.step == 5 and len(whole.losses) == 5

    run = str(tmp_path / "split")
    # Stop during step 3 (2 micro-batches per step): steps 1 and 2 are done and kept.
    with pytest.raises(KeyboardInterrupt):
        train(base, TrainingData(samples), LORA, settings, CheckpointFolder(run), Hooks(check_cancel=StopAfter(5)))
    kept = checkpoints.latest_checkpoint(run)
    assert os.path.basename(kept) == "step_000002.safetensors"
    resumed = train(base, TrainingData(samples), LORA, settings, CheckpointFolder(run, "latest"))
    assert resumed.step == 5 and [s for s, _ in resumed.losses] == [1, 2, 3, 4, 5]
    assert [l for _, l in resumed.losses] == pytest.approx([l for _, l in whole.losses], rel=1e-6)
    assert resumed.lora.keys() == whole.lora.keys()
    for key in whole.lora:
        torch.testing.assert_close(resumed.lora[key], whole.lora[key], rtol=1e-6, atol=1e-6)
    # The LoRA really trained (B starts at zero).
    assert any(whole.lora[k].abs().max() > 0 for k in whole.lora if k.endswith("lora_up.weight"))


def test_interrupt_raised_by_the_progress_hook_keeps_the_completed_step(tmp_path):
    """ComfyUI's progress hook raises on Cancel / POST /interrupt too, between steps: that step is kept."""
    base = tiny_flux(seed=1)

    def progress_that_interrupts(step, *rest):
        if step == 3:
            raise KeyboardInterrupt("interrupted from the progress bar")

    run = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        train(base, TrainingData(samples_for("flux")), LORA, TrainSettings(steps=5, **RANDOM_SETTINGS),
              CheckpointFolder(run), Hooks(progress=progress_that_interrupts))
    assert os.path.basename(checkpoints.latest_checkpoint(run)) == "step_000003.safetensors"
    resumed = train(base, TrainingData(samples_for("flux")), LORA, TrainSettings(steps=5, **RANDOM_SETTINGS),
                    CheckpointFolder(run, "latest"))
    assert [s for s, _ in resumed.losses] == [1, 2, 3, 4, 5]


def test_validation_guidance_reaches_guidance_distilled_models_only():
    """Validation images of FLUX.1-dev use the inference guidance; Qwen-Image has no guidance input."""
    from comfyui_eligen.training.model import TrainingModel
    from comfyui_eligen.training.validation import sample_latents

    for family, model, changes in (("flux", tiny_flux(seed=3, guidance_embed=True), True),
                                   ("qwen_image", tiny_qwen_image(seed=3), False)):
        sample = samples_for(family, count=1)[0]
        with torch.inference_mode(False), TrainingModel(model, LORA) as training_model:
            soft = sample_latents(training_model, sample, steps=2, seed=0, guidance=1.0)
            strong = sample_latents(training_model, sample, steps=2, seed=0, guidance=3.5)
        assert (not torch.equal(soft, strong)) == changes, family


def test_training_leaves_the_shared_model_unmodified(tmp_path):
    with torch.inference_mode():  # as a loader node makes it: inference-tensor weights
        base = tiny_flux(seed=2)
    diffusion_model = base.model.diffusion_model
    tensors = [id(p) for p in diffusion_model.parameters()]
    flags = {n: p.requires_grad for n, p in diffusion_model.named_parameters()}
    weights = {k: v.clone() for k, v in diffusion_model.state_dict().items()}
    modules = [type(m) for m in diffusion_model.modules()]
    options_before = repr(base.model_options)
    train(base, TrainingData(samples_for("flux")), LORA, TrainSettings(steps=2, **RANDOM_SETTINGS))
    assert [type(m) for m in diffusion_model.modules()] == modules
    assert not lora.lora_layers(diffusion_model)
    assert {n: p.requires_grad for n, p in diffusion_model.named_parameters()} == flags
    state = diffusion_model.state_dict()
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)
    assert repr(base.model_options) == options_before and not base.wrappers
    assert [id(p) for p in diffusion_model.parameters()] == tensors
    assert all(p.is_inference() for p in diffusion_model.parameters())


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint_with_a_finite_loss(tmp_path):
    """Learning rate 1e3 blows the weights up; the kept checkpoint is the last one whose weights still
    gave a finite loss (not the blown-up ones), and resuming from it at a sane rate trains on."""
    run = str(tmp_path / "nan")
    settings = TrainSettings(steps=8, batch_size=1, checkpoint_every=1, seed=3, learning_rate=1e3, max_grad_norm=0.0)
    with pytest.raises(TrainingStopped, match=r"the (loss|gradients) became .* at step (\d+).*last checkpoint with a finite loss") as info:
        train(tiny_flux(seed=0), TrainingData(samples_for("flux", count=2)), LORA, settings, CheckpointFolder(run))
    failed = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    kept = checkpoints.Checkpoint(checkpoints.latest_checkpoint(run))
    assert kept.step == failed - 2  # the weights of step failed - 1 gave the non-finite value
    assert os.path.exists(os.path.join(run, f"step_{failed - 1:06d}.nonfinite"))
    resumed = train(tiny_flux(seed=0), TrainingData(samples_for("flux", count=2)), LORA,
                    TrainSettings(steps=kept.step + 3, batch_size=1, seed=3, learning_rate=1e-4),
                    CheckpointFolder(run, "latest"))
    assert resumed.step == kept.step + 3
    assert all(math.isfinite(loss) for _, loss in resumed.losses[kept.step:])

    # At 1e6 the first update already blows up: its weights are set aside and the weights
    # before it (kept in memory) become step 0; resuming from them at 1e-4 trains on.
    for every in (1, 0):
        run = str(tmp_path / f"nan_first_{every}")
        settings = TrainSettings(steps=8, batch_size=1, checkpoint_every=every, seed=3, learning_rate=1e6, max_grad_norm=0.0)
        with pytest.raises(TrainingStopped, match=r"at step 2; .*last checkpoint with a finite loss: .*step_000000"):
            train(tiny_flux(seed=0), TrainingData(samples_for("flux", count=2)), LORA, settings, CheckpointFolder(run))
        kept = checkpoints.Checkpoint(checkpoints.latest_checkpoint(run))
        assert kept.step == 0 and max(float(t.abs().max()) for t in kept.lora.values()) < 10
        resumed = train(tiny_flux(seed=0), TrainingData(samples_for("flux", count=2)), LORA,
                        TrainSettings(steps=3, batch_size=1, seed=3, learning_rate=1e-4), CheckpointFolder(run, "latest"))
        assert resumed.step == 3 and all(math.isfinite(loss) for _, loss in resumed.losses)


def test_non_finite_training_data_is_refused_naming_the_sample():
    samples = samples_for("flux", count=2)
    samples[1].latent[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"training sample 1.*latent .* holds NaN or inf"):
        train(tiny_flux(seed=0), TrainingData(samples), LORA, TrainSettings(steps=2))


def test_validation_images_and_schedules():
    decoded = []

    def decode(latent):
        decoded.append(latent.shape)
        return torch.sigmoid(latent[:, :3].movedim(1, -1).repeat_interleave(8, 1).repeat_interleave(8, 2))

    settings = TrainSettings(steps=4, validation_every=2, validation_steps=3, learning_rate=1e-3)
    progress, previews = [], []
    result = train(tiny_flux(seed=0), TrainingData(samples_for("flux", 2), samples_for("flux", 1), decode=decode),
                   LORA, settings, hooks=Hooks(progress=lambda *a: progress.append(a),
                                               preview=lambda step, images: previews.append((step, images))))
    assert [step for step, _ in result.validation] == [2, 4]
    assert result.validation[0][1].shape == (1, 64, 64, 3) and decoded[0] == (1, 16, 8, 8)
    assert [p[0] for p in progress] == [1, 2, 3, 4] and progress[-1][3] == 0
    assert [(step, tuple(images.shape)) for step, images in previews] == [(2, (1, 64, 64, 3)), (4, (1, 64, 64, 3))]

    warm = TrainSettings(steps=10, warmup_steps=4, schedule="cosine")
    factors = [lr_lambda(warm)(s) for s in range(10)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0] and factors[-1] < 0.1
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    linear = [lr_lambda(TrainSettings(steps=4, schedule="linear"))(s) for s in range(4)]
    assert linear == [1.0, 0.75, 0.5, 0.25]


@pytest.mark.parametrize("changes, message", [
    (dict(steps=0), "steps must be at least 1"),
    (dict(learning_rate=0.0), "learning_rate must be a positive number"),
    (dict(schedule="step"), "schedule 'step' is not one of constant, cosine, linear"),
    (dict(precision="fp8"), "precision 'fp8' is not one of"),
    (dict(entity_dropout=1.0), "entity_dropout must be in"),
    (dict(timestep_sampling="beta"), "timestep_sampling 'beta'"),
    (dict(steps=2.5), "steps must be an integer"),
    (dict(seed=2**70), "seed must be at most 2147483647"),
    (dict(batch_size=True), "batch_size must be an integer"),
    (dict(max_grad_norm=float("nan")), "max_grad_norm must be a finite number"),
])
def test_bad_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        train(tiny_flux(), TrainingData(samples_for("flux", 1)), LORA, TrainSettings(**changes))


def test_bad_resume_requests_are_named(tmp_path):
    base, samples = tiny_flux(), TrainingData(samples_for("flux", 1))
    latest = CheckpointFolder(str(tmp_path), "latest")
    with pytest.raises(ValueError, match="no checkpoint yet"):
        train(base, samples, LORA, TrainSettings(steps=1), latest)
    with pytest.raises(ValueError, match="the dataset has no samples"):
        train(base, TrainingData([]), LORA, TrainSettings(steps=1))
    train(base, samples, LORA, TrainSettings(steps=1), CheckpointFolder(str(tmp_path)))
    bigger = lora.LoraSettings(rank=4, alpha=4, preset="eligen")
    with pytest.raises(ValueError, match=r"other LoRA settings \(rank 2 in the checkpoint, 4 now; alpha 2 in the checkpoint, 4 now\)"):
        train(base, samples, bigger, TrainSettings(steps=2), latest)
    with pytest.raises(ValueError, match="is for flux, this model is qwen_image"):
        train(tiny_qwen_image(), TrainingData(samples_for("qwen_image", 1)), LORA, TrainSettings(steps=2), latest)
    # Resuming with no step left to train says so, instead of training nothing.
    with pytest.raises(ValueError, match=r"step_000001.safetensors is at step 1 and steps is 1, so there is nothing "
                                         r"left to train; set steps above 1"):
        train(base, samples, LORA, TrainSettings(steps=1), latest)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_lora_and_checkpoints_the_loss_scale(tmp_path, precision):
    run = str(tmp_path / precision)
    result = train(tiny_flux(seed=1), TrainingData(samples_for("flux", 2)), LORA,
                   TrainSettings(steps=3, precision=precision, learning_rate=1e-2), CheckpointFolder(run))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in result.lora.values())
    assert any(result.lora[k].abs().max() > 0 for k in result.lora if k.endswith("lora_up.weight"))
    scaler = checkpoints.Checkpoint(checkpoints.latest_checkpoint(run)).info["grad_scaler"]
    assert (scaler.get("scale", 0) > 1) == (precision == "fp16")  # fp16 scales the loss, bf16 does not


def test_fp8_weights_train_in_their_compute_dtype():
    """fp8 checkpoints (e.g. qwen_image_fp8_e4m3fn) store weights in fp8 and compute in bf16."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.QwenImage({
        "image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 2,
        "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": TEXT_WIDTH,
        "axes_dims_rope": [8, 12, 12]})
    config.set_inference_dtype(torch.float8_e4m3fn, torch.bfloat16)
    with torch.inference_mode():
        base = config.get_model({})
        g = torch.Generator().manual_seed(0)
        for param in base.diffusion_model.parameters():
            param.copy_((torch.randn(param.shape, generator=g) * 0.1).to(param.dtype))
    model = comfy.model_patcher.ModelPatcher(base, comfy.model_management.get_torch_device(),
                                             comfy.model_management.unet_offload_device())
    result = train(model, TrainingData(samples_for("qwen_image", 2)), LORA,
                   TrainSettings(steps=2, precision="bf16", learning_rate=1e-2))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in result.lora.values())
    assert any(result.lora[k].abs().max() > 0 for k in result.lora if k.endswith("lora_up.weight"))
    assert base.diffusion_model.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
