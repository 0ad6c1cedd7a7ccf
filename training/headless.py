"""The headless trainer: a run file (training/run_file.py) trained without a ComfyUI server, in one
process or under torchrun (scripts/train.py is the command).

It loads the models as the loader nodes of the run file would (ComfyUI's own loading functions, through
core/host.py, or the toy world's loader), encodes the dataset with the same encoding cache, and trains
with the same loop (training/loop.py) as the EliGen Train node; rank 0 writes the checkpoints, the LoRA
``<lora_name>.safetensors`` (same format and metadata as the node's), ``loss.png`` and validation images.
"""

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from ..core import conditioning as entity_conds
from ..core import host
from ..core.adapters import adapter_for
from ..core.lora_formats import save_lora, to_reference
from . import distributed as dist_lib
from .cache import EncodingCache, encode_dataset, encode_text
from .dataset import load_dataset
from .loop import loss_graph, train
from .run_file import COMPONENTS, LOADERS, load_run, settings_of, validate_run

CACHE_FOLDER = "cache"  # beside the run folders, as the node's output/eligen_training/cache


def _toy_loader(family, weights, seed):
    from ..toyworld.models import load_toy_models

    return load_toy_models(family, weights, seed)


LOAD = {  # loader node -> its outputs, loaded as that node does
    "EliGenToyModelLoader": _toy_loader,
    "CheckpointLoaderSimple": lambda ckpt_name: host.files.load_checkpoint_file(ckpt_name),
    "UNETLoader": lambda unet_name, weight_dtype: (host.files.load_diffusion_model_file(unet_name, weight_dtype),),
    "CLIPLoader": lambda clip_name, type, device: (host.files.load_text_encoder_files([clip_name], type, device),),
    "DualCLIPLoader": lambda clip_name1, clip_name2, type, device: (
        host.files.load_text_encoder_files([clip_name1, clip_name2], type, device),),
    "VAELoader": lambda vae_name: (host.files.load_vae_file(vae_name),),
}


def load_components(run):
    """(model, clip, vae) of a checked run; a loader shared by several components is called once."""
    loaded, out = {}, []
    for component in COMPONENTS:
        spec = run[component]
        key = json.dumps(spec, sort_keys=True)
        if key not in loaded:
            loaded[key] = LOAD[spec["loader"]](**spec["inputs"])
        out.append(loaded[key][LOADERS[spec["loader"]][1][component]])
    return tuple(out)


@dataclass
class Options:
    run_dir: str                      # checkpoints, the LoRA, loss.png (default: the run file's folder)
    resume: str | None = None         # None, "latest" or a checkpoint file name
    batch_size: int | None = None     # per-rank micro-batch (default: the run file's train.batch_size)
    steps: int | None = None          # total steps (default: the run file's)
    cache_dir: str | None = None      # disk cache (default: <run_dir>/../cache)


def progress_printer(group):
    started = time.monotonic()

    def report(step, total, loss, seconds_left, previews):
        ranks = "" if group is None else f" ({group.world} ranks)"
        print(f"step {step}/{total} loss {loss:.6f}{ranks} ~{seconds_left / 60:.1f} min left "
              f"[{time.monotonic() - started:.1f} s]", flush=True)
    return report


def run(run, options, group=None):
    """Train a run (a dict as in a run file). Returns the TrainResult (on every rank) and the LoRA path (rank 0, else None)."""
    from ..nodes.training import decode_images  # the node's own helper (imports the node API)

    run = validate_run(run)
    lora_settings, settings = settings_of(run)
    overrides = {k: v for k, v in (("batch_size", options.batch_size), ("steps", options.steps)) if v is not None}
    if overrides:
        settings = type(settings)(**{**asdict(settings), **overrides}).validate()
    writer = group is None or group.is_writer
    with torch.inference_mode():  # as ComfyUI runs nodes: loaders and encoders see the same mode
        model, clip, vae = load_components(run)
        adapter = adapter_for(model)
        lora_settings.validate(adapter)
        dataset = load_dataset(run["dataset"]["folder"], run["dataset"]["max_pixels"])
        encode_options = dict(latent_format=model, entity_tokenizer_options=entity_conds.TEXT_LENGTHS[
            run["encoding"]["entity_text_length"]])
        cache_dir = options.cache_dir or os.path.join(os.path.dirname(os.path.abspath(options.run_dir)), CACHE_FOLDER)
        if group is not None:  # one shared disk cache: each entry encoded once, by its owner rank
            samples, _, _ = dist_lib.encode_shared(dataset, vae, clip, group, cache_dir, **encode_options)
        else:
            mode = run["encoding"]["cache"]
            cache = EncodingCache(cache_dir if mode == "disk" else None, keep_in_memory=mode != "off")
            samples = encode_dataset(dataset, vae, clip, cache=cache, **encode_options)
        empty = encode_text(clip, "")
        logging.info("EliGen headless training: %s", dataset.summary())

    name = run["output"]["lora_name"]
    result = train(model, samples, lora_settings, settings, run_dir=options.run_dir, resume=options.resume,
                   validation=[samples[0]] if settings.validation_every else [],
                   decode=lambda latent: decode_images(vae, latent),
                   empty_condition=empty, on_progress=progress_printer(group) if writer else None,
                   info={"lora_name": name, "global_batch": settings.batch_size * (1 if group is None else group.world)
                         * settings.grad_accumulation},
                   distributed=group)
    if not writer:
        return result, None
    metadata = {"eligen_training": {"family": adapter.family, "lora": lora_settings.to_dict(),
                                    "train": asdict(settings), "steps_done": result.step,
                                    "final_loss": result.losses[-1][1] if result.losses else None}}
    path = save_lora(os.path.join(options.run_dir, name + ".safetensors"), result.lora, metadata)
    if run["output"]["write_reference_format"]:
        save_lora(os.path.join(options.run_dir, name + "_reference.safetensors"),
                  to_reference(result.lora, adapter.lora_reference_format),
                  {**metadata, "eligen_format": adapter.lora_reference_format})
    _save_image(loss_graph(result.losses), os.path.join(options.run_dir, "loss.png"))
    for step, images in result.validation:
        for index, image in enumerate(images):
            from PIL import Image

            pixels = (image.clamp(0, 1).numpy() * 255).round().astype("uint8")
            _save_image(Image.fromarray(pixels), os.path.join(options.run_dir, f"validation_{step:06d}_{index}.png"))
    return result, path


def _save_image(image, path):
    from ..core.files import atomic_path

    with atomic_path(path) as temp:
        image.save(temp, format="PNG")


def main(argv=None, device="cpu"):
    """Command line of scripts/train.py (after ComfyUI is importable)."""
    import argparse

    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_file", help="run.json written by the EliGen Train node (or by hand)")
    parser.add_argument("--run-dir", help="folder for checkpoints, the LoRA and loss.png (default: the run file's)")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint file name in the run folder")
    parser.add_argument("--batch-size", type=int, help="micro-batch per process (default: the run file's)")
    parser.add_argument("--steps", type=int, help="total optimizer steps (default: the run file's)")
    parser.add_argument("--cache-dir", help="shared disk cache (default: <run-dir>/../cache)")
    parser.add_argument("--models-dir", help="also look for model files in this folder (ComfyUI's layout)")
    parser.add_argument("--device", default=device, choices=["cpu", "cuda"])
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard the frozen base weights over the processes (FSDP fully_shard)")
    args = parser.parse_args(argv)

    if args.models_dir:
        host.files.add_models_dir(args.models_dir)
    group = dist_lib.init_from_environment(args.device)
    rank = 0 if group is None else group.rank
    if args.fsdp and group is None:
        parser.error("--fsdp shards over processes: start it with torchrun --nproc_per_node N (N > 1)")
    if group is not None:
        group.fsdp = args.fsdp
    try:
        spec = load_run(args.run_file)
        run_dir = os.path.abspath(args.run_dir or os.path.dirname(os.path.abspath(args.run_file)))
        options = Options(run_dir=run_dir, resume=args.resume, batch_size=args.batch_size, steps=args.steps,
                          cache_dir=args.cache_dir)
        result, path = run(spec, options, group)
        if path is not None:
            print(f"saved {path} after {result.step} steps", flush=True)
    except BaseException as error:
        where = "" if group is None else f"rank {rank} of {group.world}: "
        print(f"EliGen training failed: {where}{type(error).__name__}: {error}", file=sys.stderr, flush=True)
        raise
    finally:
        if group is not None:
            group.close()
