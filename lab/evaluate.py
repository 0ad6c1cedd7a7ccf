"""In-process version of the demo's comparison: sample held-out layouts with the stock sampler in the
three conditions and score them; train the EliGen LoRA with the project's trainer.

(a) base model, global caption only; (b) base + EliGen attention (entity prompts and masks), no
LoRA; (d) base + trained EliGen LoRA + EliGen attention (the LoRA applied the stock way,
host.weights.apply_lora). The demo runs the same conditions as ComfyUI workflows; this module is what
the test suite and the multi-seed comparison use.

References scored with the placement metric's rule next to each condition (`reference_images`):
- token-fill bound: an image that paints exactly the tokens the package's mask rule
  (core.attention.mask_to_token_grid) gives each mask, at the model's token grid; what a model that
  only learned "fill my tokens" scores;
- ground-truth ceiling: the exact layout through the toy VAE (encode, decode).
"""

import tempfile
import time

import numpy as np
import torch

from ..core import host
from ..core.attention import mask_to_token_grid
from ..core.conditioning import TEXT_LENGTHS, apply_entities, encode_entity_text
from ..core.patch import patch_model
from ..toyworld import data, metric
from ..training.cache import encode_dataset
from ..training.dataset import load_dataset
from ..training.hooks import Hooks
from ..training.lora import LoraSettings
from ..training.loop import TrainingData, train
from ..training.settings import TrainSettings

SAMPLER = dict(steps=20, cfg=3.0, sampler_name="euler", scheduler="simple")  # cfg 3: measured best for a, b and d
TEXT_LENGTH = "real_length"


def sample_layout(model, clip, vae, layout, use_entities, seed, sampler=SAMPLER):
    """One image [1, H, W, 3] for a layout through comfy.sample (what KSampler runs)."""
    positive, negative = host.models.encode_prompt(clip, layout.caption), host.models.encode_prompt(clip, "")
    if use_entities:
        entities = data.layout_entities(layout, lambda text: encode_entity_text(clip, text, TEXT_LENGTH))
        positive, negative = apply_entities(positive, entities, negative)
        model = patch_model(model)
    height, width = layout.image.shape[:2]
    latent = host.models.empty_latent(model, width, height, downscale_ratio=host.encoders.vae_downscale_ratio(vae))
    samples = host.models.sample_latent(model, latent, seed, sampler["steps"], sampler["cfg"], sampler["sampler_name"],
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


def token_grid(model, vae, height, width):
    """(latent height, latent width, patch): the grid the model's tokens live on for this image size."""
    ratio = host.encoders.vae_downscale_ratio(vae)
    return height // ratio, width // ratio, host.models.patch_size(model.model)


def token_fill_image(masks, prompts, latent_hw, patch=2, background=(128, 128, 128)):
    """uint8 [H, W, 3]: each entity's palette colour on exactly the tokens the package's mask rule
    (core.attention.mask_to_token_grid) gives its mask at a latent of `latent_hw` with `patch` x `patch`
    patches; the rest `background`. A token that several masks reach goes to the entity whose mask covers
    most of its pixels (ties: the later entity, which the layouts draw on top)."""
    masks = np.asarray(masks).astype(bool)
    count, height, width = masks.shape
    if height % latent_hw[0] or width % latent_hw[1]:
        raise ValueError(f"masks of {height}x{width} px do not divide into a {latent_hw[0]}x{latent_hw[1]} latent")
    step_y, step_x = height // latent_hw[0] * patch, width // latent_hw[1] * patch
    grid = mask_to_token_grid(torch.from_numpy(masks.astype(np.float32)), latent_hw, patch).numpy()
    rows, cols = grid.shape[-2:]
    padded = np.zeros((count, rows * step_y, cols * step_x), bool)
    padded[:, :height, :width] = masks
    coverage = padded.reshape(count, rows, step_y, cols, step_x).sum(axis=(2, 4)).astype(np.float64)
    coverage[~grid] = -1.0
    owner = count - 1 - coverage[::-1].argmax(axis=0)  # ties to the later entity
    painted = grid.any(axis=0)
    colours = np.array([data.PALETTE[metric.colour_of(prompt)] for prompt in prompts], np.uint8).reshape(-1, 3)
    image = np.empty((rows, cols, 3), np.uint8)
    image[:] = background
    image[painted] = colours[owner[painted]]
    return np.repeat(np.repeat(image, step_y, axis=0), step_x, axis=1)[:height, :width]


REFERENCES = {
    "fill": "token-fill bound (exactly the masks' tokens painted)",
    "truth": "ground truth through the toy VAE (ceiling)",
}


def reference_images(model, vae, layouts):
    """{"fill": [uint8 images], "truth": [float images]}: the two references (module text) for each layout."""
    fill, truth = [], []
    for layout in layouts:
        height, width = layout.image.shape[:2]
        latent_h, latent_w, patch = token_grid(model, vae, height, width)
        colours = [e.prompt for e in layout.entities]
        fill.append(token_fill_image(layout.masks, colours, (latent_h, latent_w), patch,
                                     data.BACKGROUNDS[layout.background]))
        pixels = torch.from_numpy(layout.image[None].astype("float32") / 255.0)
        with torch.inference_mode():
            truth.append(vae.decode(vae.encode(pixels)).reshape(height, width, 3).clamp(0, 1).numpy())
    return {"fill": fill, "truth": truth}


def score_references(model, vae, layouts):
    """{reference: metric result} for the token-fill bound and the ground-truth ceiling."""
    masks = [layout.masks for layout in layouts]
    prompts = [[e.prompt for e in layout.entities] for layout in layouts]
    return {name: metric.score_images(images, masks, prompts)
            for name, images in reference_images(model, vae, layouts).items()}


# ---------------------------------------------------------------------------------------------
# Training (the project's trainer, called as the training node calls it)

# The toy recipe (feasibility run: rank 8 on every block linear but the modulation, 200 x 32 at lr 3e-3).
TRAIN_DEFAULTS = dict(steps=200, batch_size=32, learning_rate=3e-3, rank=8, warmup_steps=20, count=512)
TRAIN_FIXED = dict(schedule="cosine", timestep_sampling="logit_normal", preset="no_modulation")


def encoded_training_samples(model, clip, vae, folder):
    dataset = load_dataset(folder)
    return encode_dataset(dataset, vae, clip, latent_format=model,
                          entity_tokenizer_options=TEXT_LENGTHS[TEXT_LENGTH])


def training_samples(model, clip, vae, count=512, data_seed=0, size=data.SIZE, write_dataset=data.write_dataset):
    """Write `count` training layouts (`write_dataset(folder, count, seed=, split=, size=)`) into a temp
    folder and return them encoded as the trainer takes them (the folder is removed)."""
    with tempfile.TemporaryDirectory(prefix="eligen-toy-train-") as folder:
        write_dataset(folder, count, seed=data_seed, split="train", size=size)
        with torch.inference_mode():
            return encoded_training_samples(model, clip, vae, folder)


def train_lora(model, clip, vae, seed=0, steps=200, batch_size=32, learning_rate=3e-3, rank=8, warmup_steps=20,
               count=512, data_seed=0, log=None, write_dataset=data.write_dataset, size=data.SIZE, samples=None,
               **recipe):
    """Write `count` training layouts, encode them and train an EliGen LoRA with training/loop.py (the
    EliGenTrain node's trainer, same settings as workflow c). Returns (lora state dict, losses
    [(step, loss)], seconds). `write_dataset(folder, count, seed=, split=, size=)` writes the training set
    (another writer trains another LoRA the same way, e.g. style.py's captions-only style set).
    `samples`: the training set already encoded (what `training_samples` returns for these count,
    data_seed, size and writer), so several runs on one set encode it once.
    `recipe`: other TRAIN_FIXED / TrainSettings / LoraSettings fields (ablations.py varies them)."""
    if samples is None:
        samples = training_samples(model, clip, vae, count, data_seed, size, write_dataset)
    empty = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    recipe = dict(TRAIN_FIXED, **recipe)
    lora_fields = {"preset", "dropout"}
    lora_settings = LoraSettings(rank=rank, alpha=float(rank), **{k: v for k, v in recipe.items() if k in lora_fields})
    settings = TrainSettings(steps=steps, learning_rate=learning_rate, batch_size=batch_size,
                             warmup_steps=warmup_steps, seed=seed, precision="fp32",
                             gradient_checkpointing=False,  # as the toy workflows
                             **{k: v for k, v in recipe.items() if k not in lora_fields})
    started = time.time()
    def progress(step, total, loss, left):
        if log is not None and (step % 25 == 0 or step == total):
            log(f"train step {step}/{total} loss {loss:.4f}, about {left:.0f} s left")

    result = train(model, TrainingData(samples, empty=empty), lora_settings, settings, hooks=Hooks(progress=progress))
    return result.lora, result.losses, time.time() - started
