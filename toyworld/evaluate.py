"""In-process version of the demo's comparison: sample held-out layouts with the stock sampler in the
three conditions and score them; train the EliGen LoRA with the project's trainer.

(a) base model, global caption only; (b) base + EliGen attention (entity prompts and masks), no
LoRA; (d) base + trained EliGen LoRA + EliGen attention. The demo runs the same conditions as
ComfyUI workflows; this module is what the test suite and the multi-seed comparison use.
"""

import tempfile
import time

import torch

from ..core import host
from ..core.conditioning import TEXT_LENGTHS, apply_entities, encode_entity_text
from ..core.patch import patch_model
from . import data, metric

SAMPLER = dict(steps=20, cfg=3.0, sampler_name="euler", scheduler="simple")  # cfg 3: measured best for a, b and d
TEXT_LENGTH = "real_length"


def encode_prompt(clip, text):
    return host.encode_prompt(clip, text)


def sample_layout(model, clip, vae, layout, use_entities, seed, sampler=SAMPLER):
    """One image [1, H, W, 3] for a layout through comfy.sample (what KSampler runs)."""
    positive, negative = encode_prompt(clip, layout.caption), encode_prompt(clip, "")
    if use_entities:
        entities = data.layout_entities(layout, lambda text: encode_entity_text(clip, text, TEXT_LENGTH))
        positive, negative = apply_entities(positive, entities, negative)
        model = patch_model(model)
    height, width = layout.image.shape[:2]
    latent = host.empty_latent(model, width, height)
    samples = host.sample_latent(model, latent, seed, sampler["steps"], sampler["cfg"], sampler["sampler_name"],
                                 sampler["scheduler"], positive, negative)
    return vae.decode(samples).reshape(-1, height, width, 3)


def score_condition(model, clip, vae, layouts, use_entities, seed=0, sampler=SAMPLER):
    """Sample every layout (noise seed = seed * 100003 + index, as EliGenToyLayouts) and score them.
    Returns (metric result, images list)."""
    images = []
    with torch.inference_mode():
        for index, layout in enumerate(layouts):
            images.append(sample_layout(model, clip, vae, layout, use_entities, seed * 100003 + index, sampler))
    result = metric.score_images(
        [image[0].numpy() for image in images], [layout.masks for layout in layouts],
        [[e.prompt for e in layout.entities] for layout in layouts])
    return result, images


# ---------------------------------------------------------------------------------------------
# Training (the project's trainer, called as the training node calls it)

# The toy recipe (feasibility run: rank 8 on every block linear but the modulation, 200 x 32 at lr 3e-3).
TRAIN_DEFAULTS = dict(steps=200, batch_size=32, learning_rate=3e-3, rank=8, warmup_steps=20, count=512)
TRAIN_FIXED = dict(schedule="cosine", timestep_sampling="logit_normal", preset="no_modulation")


def encoded_training_samples(model, clip, vae, folder):
    from ..training.cache import encode_dataset
    from ..training.dataset import load_dataset

    dataset = load_dataset(folder)
    return encode_dataset(dataset, vae, clip, latent_format=model,
                          entity_tokenizer_options=TEXT_LENGTHS[TEXT_LENGTH])


def train_lora(model, clip, vae, seed=0, steps=200, batch_size=32, learning_rate=3e-3, rank=8, warmup_steps=20,
               count=512, data_seed=0, log=None):
    """Write `count` training layouts, encode them and train an EliGen LoRA with training/loop.py (the
    EliGenTrain node's trainer, same settings as workflow c). Returns (lora state dict, losses
    [(step, loss)], seconds)."""
    from ..training.lora import LoraSettings
    from ..training.loop import TrainSettings, train

    with tempfile.TemporaryDirectory(prefix="eligen-toy-train-") as folder:
        data.write_dataset(folder, count, seed=data_seed, split="train")
        with torch.inference_mode():
            samples = encoded_training_samples(model, clip, vae, folder)
    empty = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    lora_settings = LoraSettings(rank=rank, alpha=float(rank), preset=TRAIN_FIXED["preset"])
    settings = TrainSettings(steps=steps, learning_rate=learning_rate, batch_size=batch_size,
                             schedule=TRAIN_FIXED["schedule"], warmup_steps=warmup_steps,
                             timestep_sampling=TRAIN_FIXED["timestep_sampling"], seed=seed,
                             precision="fp32", gradient_checkpointing=False)  # as the toy workflows
    started = time.time()
    def progress(step, total, loss, left, previews):
        if log is not None and (step % 25 == 0 or step == total):
            log(f"train step {step}/{total} loss {loss:.4f}, about {left:.0f} s left")

    result = train(model, samples, lora_settings, settings, empty_condition=empty, on_progress=progress)
    return result.lora, result.losses, time.time() - started


def with_lora(model, lora_sd, strength=1.0):
    """The stock path (what LoraLoaderModelOnly does), on a clone."""
    return host.apply_lora(model, lora_sd, strength)
