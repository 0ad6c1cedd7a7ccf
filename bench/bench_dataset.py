"""Benchmark: the data side of one training epoch with and without the encoding cache.

An "epoch" here is `encode_dataset` over a synthetic folder dataset (N images with two entities each):
- uncached:      a fresh, empty cache (every encoder runs; what a trainer without a cache pays per epoch),
- cached memory: the same cache object again (a later epoch),
- cached disk:   a fresh cache object on the same directory (a later run).
Timings are medians over --repeats; the summary reports ratios against the uncached epoch of this run.

Encoders: `--encoders real` (default) builds ComfyUI's own classes at real widths with random weights:
the FLUX VAE architecture (AutoencoderKL, ch 128, ch_mult 1-2-4-4, 16 latent channels) through
comfy.sd.VAE, and a CLIP-L text encoder through comfy.sd.CLIP (T5-XXL is too large to build here; CLIP-L
makes the text side cheaper than in real FLUX, so the measured gain is a lower bound).
`--encoders toy` uses the toy world's encoders (fast; a smoke run).

    .venv/bin/python bench/bench_dataset.py [--device cuda] [--images 8] [--size 256] [--encoders toy]

Prints one JSON line.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
from comfy_env import setup_comfy  # noqa: E402


def real_encoders(seed=0):
    import torch

    import comfy.latent_formats
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.sd.VAE(sd={}, config={"params": {"ddconfig": ddconfig, "embed_dim": 16}})
    clip = comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer,
                                                                       comfy.sd1_clip.SD1ClipModel))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # comfy.ops layers start as torch.empty: give them finite values
        for module in (vae.first_stage_model, clip.cond_stage_model):
            for param in module.parameters():
                param.copy_((torch.randn(param.shape, generator=generator) * 0.02).to(param.dtype))
    return vae, clip, comfy.latent_formats.Flux()


def toy_encoders():
    from comfyui_eligen.toyworld.models import load_toy_models

    model, clip, vae = load_toy_models("flux", "random")
    return vae, clip, model


def make_dataset(folder, images, size):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue", "yellow", "magenta", "cyan"]
    items = []
    for i in range(images):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))
        masks = []
        for k in range(2):
            mask = np.zeros((size, size), np.uint8)
            mask[:, k * size // 2:(k + 1) * size // 2] = 255
            Image.fromarray(mask).save(os.path.join(folder, f"{i}_m{k}.png"))
            masks.append(f"{i}_m{k}.png")
        a, b = colours[i % 6], colours[(i + 1) % 6]
        items.append({"image": f"{i}.png", "prompt": f"a {a} circle on the left and a {b} square on the right, "
                                                     f"picture number {i}",
                      "eligen_entity_prompts": [f"a {a} circle", f"a {b} square"], "eligen_entity_masks": masks})
    with open(os.path.join(folder, "metadata.json"), "w") as f:
        json.dump(items, f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=128, help="square image side in pixels")
    parser.add_argument("--encoders", default="real", choices=["real", "toy"])
    parser.add_argument("--repeats", type=int, default=2)
    opts = parser.parse_args()
    setup_comfy(opts.device)

    from comfyui_eligen.training.cache import EncodingCache, encode_dataset
    from comfyui_eligen.training.dataset import load_dataset

    vae, clip, latent_format = real_encoders() if opts.encoders == "real" else toy_encoders()
    with tempfile.TemporaryDirectory() as work:
        data = os.path.join(work, "data")
        os.makedirs(data)
        make_dataset(data, opts.images, opts.size)
        dataset = load_dataset(data, max_pixels=opts.size * opts.size)

        def epoch(cache):
            start = time.perf_counter()
            encode_dataset(dataset, vae, clip, latent_format, cache=cache)
            return time.perf_counter() - start

        epoch(EncodingCache())  # warm-up: first-call costs (weight loading, kernel selection) are not the cache's
        uncached, memory, disk = [], [], []
        for r in range(opts.repeats):
            directory = os.path.join(work, f"cache{r}")
            first = EncodingCache(directory)
            uncached.append(epoch(first))
            memory.append(epoch(first))
            later = EncodingCache(directory)
            disk.append(epoch(later))
        first_calls = dict(first.encoder_calls)
        later_calls = dict(later.encoder_calls)
    u, m, d = statistics.median(uncached), statistics.median(memory), statistics.median(disk)
    print(json.dumps({
        "bench": "dataset_cache", "device": opts.device, "encoders": opts.encoders, "images": opts.images,
        "size": opts.size, "entities_per_image": 2, "repeats": opts.repeats,
        "uncached_epoch_s": round(u, 4), "cached_memory_epoch_s": round(m, 4), "cached_disk_epoch_s": round(d, 4),
        "speedup_memory": round(u / m, 1), "speedup_disk": round(u / d, 1),
        "encoder_calls_first_run": first_calls, "encoder_calls_later_run": later_calls,
    }))


if __name__ == "__main__":
    main()
