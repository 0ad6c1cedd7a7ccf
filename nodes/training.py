"""Training nodes: LoRA settings and the in-process EliGen LoRA trainer.

``EliGenTrain`` encodes the dataset (cached), trains with training/loop.py inside the ComfyUI process,
saves the LoRA into models/loras atomically, and returns a MODEL with it applied through the stock
LoRA path, so it samples with the stock KSampler at once and stacks with other LoRAs.
"""

import logging
import os
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image

from comfy_api.latest import io

from ..core import conditioning as entity_conds
from ..core import host
from ..core.adapters import adapter_for
from ..core.lora_formats import load_lora, save_lora, to_reference
from ..core.mask_rule import resize_nearest
from ..training import lora as lora_lib
from ..training.cache import EncodingCache, encode_dataset, encode_text, shared_cache
from ..training.loop import Sample, TrainSettings, loss_graph, train
from .settings_inputs import setting_inputs, settings_from_inputs
from ..training.faults import check_validation_inputs
from ..training.outputs import plain_lora_name, start_run
from ..training.run_file import export_run
from ..training.progress import encoding_progress

CATEGORY = "EliGen/training"
LoraConfig = io.Custom("ELIGEN_LORA_CONFIG")
Dataset = io.Custom("ELIGEN_DATASET")
Entities = io.Custom("ELIGEN_ENTITIES")
PRESETS = ["eligen", "no_modulation", "attention", lora_lib.ALL_BLOCK_LINEARS, lora_lib.CUSTOM]
CACHE_MODES = ["memory", "disk", "off"]
RUNS_FOLDER = "eligen_training"


class EliGenLoraConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EliGenLoraConfig",
            display_name="EliGen LoRA Config",
            category=CATEGORY,
            description="Which layers get a LoRA and how it is shaped. The reference EliGen recipe: rank 32, "
                        "alpha 32, no dropout, preset 'eligen'.",
            inputs=[
                io.Int.Input("rank", default=32, min=1, max=1024, tooltip="LoRA rank (inner size of each adapter)."),
                io.Float.Input("alpha", default=32.0, min=0.001, max=4096.0, step=0.5,
                               tooltip="LoRA alpha; the update is scaled by alpha / rank (alpha = rank: scale 1, "
                                       "as the reference)."),
                io.Float.Input("dropout", default=0.0, min=0.0, max=0.9, step=0.01,
                               tooltip="Dropout on the LoRA input during training (0 in the reference)."),
                io.Combo.Input("init", options=list(lora_lib.INITS), default="kaiming",
                               tooltip="Initial A matrices (B starts at zero, so training starts from the base "
                                       "model): kaiming = peft's default, gaussian = normal / rank."),
                io.Combo.Input("preset", options=PRESETS, default="eligen",
                               tooltip="Target layers. eligen: the reference's targets (FLUX: attention, MLP and "
                                       "modulation of every block; Qwen-Image: attention, MLP down-projections, "
                                       "modulation). no_modulation / attention: subsets. all_block_linears: every "
                                       "Linear in the blocks. custom: the regex below."),
                io.String.Input("custom_pattern", default="", optional=True,
                                tooltip="With preset 'custom': a regex that must fully match ComfyUI module names, "
                                        r"e.g. double_blocks\.\d+\.img_attn\.(qkv|proj)"),
                io.Combo.Input("dtype", options=list(lora_lib.DTYPES), default="float32",
                               tooltip="Dtype of the LoRA weights while training (float32 = an fp32 master copy "
                                       "even when the model runs in bf16)."),
            ],
            outputs=[LoraConfig.Output(display_name="lora_config")],
        )

    @classmethod
    def execute(cls, rank, alpha, dropout, init, preset, dtype, custom_pattern="") -> io.NodeOutput:
        settings = lora_lib.LoraSettings(rank=rank, alpha=alpha, dropout=dropout, init=init, preset=preset,
                                         custom_pattern=custom_pattern or "", dtype=dtype)
        return io.NodeOutput(settings.validate())


class EliGenTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EliGenTrain",
            display_name="EliGen Train LoRA",
            category=CATEGORY,
            description="Trains an EliGen LoRA in this ComfyUI process with the regional entity attention active, "
                        "saves it into models/loras and returns the model with it applied. Cancel stops within "
                        "one step and keeps a checkpoint; 'resume' continues a run.",
            inputs=[
                io.Model.Input("model", tooltip="FLUX.1 (dev/schnell) or Qwen-Image from the stock loaders. It is "
                               "not modified: other branches of the graph keep seeing the base model."),
                io.Clip.Input("clip", tooltip="The model's text encoder (entity and global prompts)."),
                io.Vae.Input("vae", tooltip="The model's VAE (images to latents, and validation images)."),
                Dataset.Input("dataset", tooltip="From EliGen Dataset: images, captions, entity prompts and masks."),
                LoraConfig.Input("lora_config", tooltip="From EliGen LoRA Config."),
                io.String.Input("lora_name", default="eligen_lora",
                                tooltip="File name in models/loras (.safetensors is added) and the name of the "
                                        "checkpoint folder output/eligen_training/<name>."),
                *setting_inputs(TrainSettings),
                io.String.Input("resume", default="",
                                tooltip="Empty: a new run. 'latest': continue the last checkpoint of this lora_name. "
                                        "Or a checkpoint file name such as step_000250.safetensors."),
                io.Boolean.Input("write_reference_format", default=False,
                                 tooltip="Also write <name>_reference.safetensors in the reference's key format "
                                         "(kohya keys for FLUX, peft keys for Qwen-Image)."),
                io.Combo.Input("cache", options=CACHE_MODES, default="memory",
                               tooltip="Encoded latents and prompts: memory (reused in this ComfyUI session), disk "
                                       "(also output/eligen_training/cache, reused across restarts), off."),
                io.Combo.Input("entity_text_length", options=list(entity_conds.TEXT_LENGTHS), default="padded_512",
                               tooltip="FLUX T5 length of entity prompts: padded_512 as the released adapter, "
                                       "real_length for less attention work. Qwen-Image is never padded."),
                io.Conditioning.Input("validation_positive", optional=True,
                                      tooltip="Global prompt of the validation image (default: the first record's)."),
                Entities.Input("validation_entities", optional=True,
                               tooltip="Entities of the validation image (default: the first record's)."),
                *setting_inputs(TrainSettings, optional=True),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The input model with the trained LoRA applied."),
                io.String.Output(display_name="lora_name", tooltip="The saved file, as LoraLoader lists it."),
                io.Image.Output(display_name="loss_graph"),
                io.Image.Output(display_name="validation_images"),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, lora_config, lora_name, resume, write_reference_format, cache,
                entity_text_length, validation_positive=None, validation_entities=None,
                **settings) -> io.NodeOutput:
        settings = settings_from_inputs(TrainSettings, settings).validate()
        result = run_training(model, clip, vae, dataset, lora_config, settings, lora_name, resume=resume,
                              write_reference_format=write_reference_format, cache_mode=cache,
                              entity_text_length=entity_text_length, validation_positive=validation_positive,
                              validation_entities=validation_entities, node_id=cls.hidden.unique_id,
                              graph=cls.hidden.prompt)
        return io.NodeOutput(result["model"], result["lora_name"], result["loss_graph"], result["validation"])


# ---------------------------------------------------------------------------------------------------
# The work behind the node (plain functions)


def run_training(model, clip, vae, dataset, lora_settings, settings, lora_name, resume="",
                 write_reference_format=False, cache_mode="memory", entity_text_length="padded_512",
                 validation_positive=None, validation_entities=None, node_id=None, graph=None):
    name = plain_lora_name(lora_name)
    adapter = adapter_for(model)
    lora_settings.validate(adapter)
    if cache_mode not in CACHE_MODES:
        raise ValueError(f"cache {cache_mode!r} is not one of {', '.join(CACHE_MODES)}")
    if entity_text_length not in entity_conds.TEXT_LENGTHS:
        raise ValueError(f"entity_text_length {entity_text_length!r} is not one of {', '.join(entity_conds.TEXT_LENGTHS)}")
    resume = (resume or "").strip()
    runs = os.path.join(host.files.output_directory(), RUNS_FOLDER)
    run_dir = start_run(name, host.files.lora_folder(), runs, resume)
    if graph is not None:  # run.json beside the checkpoints, for scripts/train.py (headless, torchrun)
        export_run(run_dir, graph, node_id, dataset=dataset, lora_settings=lora_settings, settings=settings,
                   lora_name=name, cache=cache_mode, entity_text_length=entity_text_length,
                   write_reference_format=write_reference_format,
                   graph_validation=validation_positive is not None or validation_entities is not None)

    encoding_cache = {"memory": lambda: shared_cache(None), "disk": lambda: shared_cache(os.path.join(runs, "cache")),
                      "off": lambda: EncodingCache(None)}[cache_mode]()
    samples = encode_dataset(dataset, vae, clip, latent_format=model, cache=encoding_cache,
                             entity_tokenizer_options=entity_conds.TEXT_LENGTHS[entity_text_length],
                             progress=encoding_progress(node_id))
    empty = encode_text(clip, "")
    # Every sample is encoded: the text encoders and the VAE leave the GPU for the steps.
    release_encoders(clip, vae)
    validation = []
    if settings.validation_every:
        validation = [validation_sample(samples[0], validation_positive, validation_entities, adapter.latent_scale)]

    progress = host.files.progress_bar(settings.steps, node_id=node_id)
    result = train(
        model, samples, lora_settings, settings, run_dir=run_dir, resume=resume or None,
        validation=validation, decode=lambda latent: decode_and_release(vae, latent), empty_condition=empty,
        on_progress=progress_reporter(progress, node_id),
        check_interrupt=host.files.interrupt_check(),
        info={"lora_name": name},
    )

    metadata = {"eligen_training": {"family": adapter.family, "lora": lora_settings.to_dict(),
                                    "train": asdict(settings), "steps_done": result.step,
                                    "final_loss": result.losses[-1][1] if result.losses else None}}
    loras = host.files.lora_folder()
    path = save_lora(os.path.join(loras, name + ".safetensors"), result.lora, metadata)
    if write_reference_format:
        save_lora(os.path.join(loras, name + "_reference.safetensors"),
                  to_reference(result.lora, adapter.lora_reference_format),
                  {**metadata, "eligen_format": adapter.lora_reference_format})
    # The same path as the stock LoraLoaderModelOnly: read the file back, patch a clone.
    trained = host.weights.apply_lora(model.clone(), load_lora(path), 1.0)
    images = [images for _, images in result.validation]
    return {
        "model": trained,
        "lora_name": os.path.basename(path),
        "loss_graph": pil_to_image(loss_graph(result.losses)),
        "validation": torch.cat(images) if images else torch.zeros(1, 64, 64, 3),
        "result": result,
        "path": path,
    }


def validation_sample(first, positive=None, entities=None, latent_scale=8):
    """What validation samples: the given prompt/entities at the first record's size, else the first record."""
    if positive is None and entities is None:
        return first
    context, pooled = first.context, first.pooled
    if positive is not None:
        context = positive[0][0]
        pooled = positive[0][1].get("pooled_output", pooled)
    embeds, masks = first.entity_embeds, first.masks
    check_validation_inputs(first, positive, entities, first.context.shape[-1])
    if entities is not None:
        size = tuple(first.masks.shape[-2:]) if first.masks.numel() else None
        if size is None:
            size = tuple(int(s) * latent_scale for s in first.latent.shape[-2:])
        embeds = [e.embeds for e in entities]
        masks = torch.stack([resize_nearest(e.mask.float(), size) for e in entities]) \
            if entities else torch.zeros(0, *size)
    return Sample(first.latent, context, pooled, list(embeds), masks)


def decode_images(vae, latent):
    images = vae.decode(latent)
    if images.ndim == 5:  # video-style VAEs return [B, T, H, W, 3]
        images = images.reshape(-1, *images.shape[-3:])
    return images


def release_encoders(clip, vae):
    """Unload the text encoder and the VAE from ComfyUI's loaded models (they go to their offload device)."""
    for patcher in (getattr(clip, "patcher", None), getattr(vae, "patcher", None)):
        if patcher is not None:
            host.memory.unload_model(patcher)


def decode_and_release(vae, latent):
    """Validation images: the VAE comes to the GPU for the decode only."""
    try:
        return decode_images(vae, latent)
    finally:
        if getattr(vae, "patcher", None) is not None:
            host.memory.unload_model(vae.patcher)


def progress_reporter(progress, node_id):
    """on_progress for train(): the node's progress bar (with the validation preview) and a text line."""
    def report(step, total, loss, seconds_left, previews):
        preview = None
        if previews is not None and len(previews):
            image = Image.fromarray((previews[-1].clamp(0, 1).numpy() * 255).astype(np.uint8))
            preview = ("JPEG", image, 512)
        progress.update_absolute(step, total, preview)
        text = f"step {step}/{total}  loss {loss:.4f}  ~{seconds_left / 60:.1f} min left"
        logging.info("EliGen training: %s", text)
        host.files.send_progress_text(text, node_id)  # no server (plain use): the log line is enough
    return report


def pil_to_image(image):
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


NODES = [EliGenLoraConfig, EliGenTrain]
