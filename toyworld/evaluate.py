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
    latent = host.empty_latent(model, width, height, downscale_ratio=vae.downscale_ratio)
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


def token_grid(model, vae, height, width):
    """(latent height, latent width, patch): the grid the model's tokens live on for this image size."""
    ratio = vae.downscale_ratio
    patch = int(model.model.model_config.unet_config.get("patch_size", 2))
    return height // ratio, width // ratio, patch


REFERENCES = {
    "fill": "token-fill bound (exactly the masks' tokens painted)",
    "truth": "ground truth through the toy VAE (ceiling)",
}


def reference_images(model, vae, layouts):
    """{"fill": [uint8 images], "truth": [float images]}: the two references of metric.py for each layout."""
    fill, truth = [], []
    for layout in layouts:
        height, width = layout.image.shape[:2]
        latent_h, latent_w, patch = token_grid(model, vae, height, width)
        colours = [e.prompt for e in layout.entities]
        fill.append(metric.token_fill_image(layout.masks, colours, (latent_h, latent_w), patch,
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
    from ..training.cache import encode_dataset
    from ..training.dataset import load_dataset

    dataset = load_dataset(folder)
    return encode_dataset(dataset, vae, clip, latent_format=model,
                          entity_tokenizer_options=TEXT_LENGTHS[TEXT_LENGTH])


def train_lora(model, clip, vae, seed=0, steps=200, batch_size=32, learning_rate=3e-3, rank=8, warmup_steps=20,
               count=512, data_seed=0, log=None, write_dataset=data.write_dataset, size=data.SIZE, **recipe):
    """Write `count` training layouts, encode them and train an EliGen LoRA with training/loop.py (the
    EliGenTrain node's trainer, same settings as workflow c). Returns (lora state dict, losses
    [(step, loss)], seconds). `write_dataset(folder, count, seed=, split=, size=)` writes the training set
    (another writer trains another LoRA the same way, e.g. style.py's captions-only style set).
    `recipe`: other TRAIN_FIXED / TrainSettings / LoraSettings fields (ablations.py varies them)."""
    from ..training.lora import LoraSettings
    from ..training.hooks import Hooks
    from ..training.loop import TrainingData, train
    from ..training.settings import TrainSettings

    with tempfile.TemporaryDirectory(prefix="eligen-toy-train-") as folder:
        write_dataset(folder, count, seed=data_seed, split="train", size=size)
        with torch.inference_mode():
            samples = encoded_training_samples(model, clip, vae, folder)
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


def with_lora(model, lora_sd, strength=1.0):
    """The stock path (what LoraLoaderModelOnly does), on a clone."""
    return host.apply_lora(model, lora_sd, strength)


# ---------------------------------------------------------------------------------------------
# Command-line runs (compare.py, style.py)

def add_run_arguments(parser, seeds, layouts):
    """The options every multi-seed toy run shares: family, seeds, held-out layouts, the training
    recipe (TRAIN_DEFAULTS), the sampler, threads and the output files."""
    from . import models

    parser.add_argument("--family", default="flux", choices=sorted(models.FAMILIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds)
    parser.add_argument("--layouts", type=int, default=layouts, help="held-out layouts (per group) and seed")
    parser.add_argument("--layout-seed", type=int, default=0)
    parser.add_argument("--size", type=data.image_side, default=data.SIZE,
                        help=f"image side in px (default {data.SIZE}: 16x16 tokens; {data.QUICK_SIZE}: 8x8 tokens, "
                        "about 4x cheaper)")
    for name, value in TRAIN_DEFAULTS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--sample-steps", type=int, default=SAMPLER["steps"])
    parser.add_argument("--cfg", type=float, default=SAMPLER["cfg"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--weights-file", help="toy base weights (default: the shipped file of the family)")
    parser.add_argument("--vae-pool", type=int, default=models.POOL,
                        help="toy VAE downscale factor (8: 8x8 tokens at 128 px; 4: 16x16 tokens, needs a base "
                        "built with build-weights --vae-pool 4)")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--markdown", help="write the tables as Markdown here")


def load_run_models(args):
    """(model, clip, vae) for add_run_arguments' options."""
    from . import models

    return models.load_toy_models(args.family, "pretrained", weights_file=args.weights_file, pool=args.vae_pool)


def run_settings(args):
    """(training settings, sampler) from add_run_arguments' options; sets torch's thread count."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return ({name: getattr(args, name) for name in TRAIN_DEFAULTS} | {"size": args.size},
            dict(SAMPLER, steps=args.sample_steps, cfg=args.cfg))
