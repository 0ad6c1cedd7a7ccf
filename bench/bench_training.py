"""Benchmark: EliGen training step time and peak memory, against ComfyUI's built-in TrainLoraNode.

Every configuration runs in its own child process (so peak memory is its own: on CPU the peak resident
set above the process's size before training; on CUDA torch.cuda.max_memory_allocated) on the same
model and data:

  builtin            ComfyUI's TrainLoraNode.execute (its own LoRA on every Linear, MSE, AdamW)
  builtin_ckpt       the same with its gradient checkpointing
  ours_plain         training/loop.train, global captions only, LoRA on every Linear (custom ".+")
  ours_entities      the same with 2 entities per image and the EliGen attention active
  ours_entities_ckpt the same with gradient checkpointing
  epoch_uncached / epoch_cached   (toy model only) one epoch = encode_dataset + the training steps, with
                     an empty cache vs a warm one

Times are the median seconds between consecutive optimizer steps (set-up and first step excluded);
ratios are against `builtin` measured in the same run. TrainLoraNode in ComfyUI 0.3.75 computes wrong
FLUX gradients (in-place blocks, comfyui.md): it is timed anyway.

    .venv/bin/python bench/bench_training.py                      # toy FLUX on CPU (smoke size)
    .venv/bin/python bench/bench_training.py --device cuda --real-widths   # FLUX.1 widths at 1024 px

--real-widths builds FLUX.1's block width (hidden 3072, 24 heads, rope axes 16/56/56, T5 4096, pooled
768, guidance embedding) with random weights and --double/--single blocks (default 2 + 4: the real model
has 19 + 38; time per block scales linearly), at 1024x1024 (4096 image tokens), bf16.
Prints one JSON line.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
from comfy_env import setup_comfy  # noqa: E402
CONFIGS = ["builtin", "builtin_ckpt", "ours_plain", "ours_entities", "ours_entities_ckpt"]
EPOCH_CONFIGS = ["epoch_uncached", "epoch_cached"]


# ---------------------------------------------------------------------------------------------------
# Model and data (built inside each child)


def build(opts):
    """(ModelPatcher, latents [B, 16, h, w], contexts, pooled, entity embeds, masks)."""
    import torch

    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    from comfyui_eligen.toyworld.models import init_weights

    if opts.real_widths:
        unet = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
                "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24,
                "depth": opts.double, "depth_single_blocks": opts.single, "axes_dim": [16, 56, 56],
                "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
        text, pooled_width, prompt_tokens, entity_tokens, side = 4096, 768, 128, 16, opts.size or 1024
        dtype = torch.bfloat16
    else:
        unet = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 64,
                "context_in_dim": 64, "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 2,
                "depth": 2, "depth_single_blocks": 2, "axes_dim": [16, 24, 24], "theta": 10000,
                "patch_size": 2, "qkv_bias": True, "guidance_embed": False}
        text, pooled_width, prompt_tokens, entity_tokens, side = 64, 64, 12, 3, opts.size or 128
        dtype = torch.float32
    config = comfy.supported_models.Flux(unet)
    config.set_inference_dtype(dtype, None)
    device = comfy.model_management.get_torch_device()
    # Built outside inference mode: TrainLoraNode cannot backpropagate through inference-tensor weights
    # (ours can: training/model.py aliases them), and both should see the same model.
    base = config.get_model({}, device=device if opts.real_widths else None)
    init_weights(base.diffusion_model, seed=0)
    model = comfy.model_patcher.ModelPatcher(base, device, comfy.model_management.unet_offload_device())
    g = torch.Generator().manual_seed(0)
    h = side // 8
    latents = torch.randn(opts.images, 16, h, h, generator=g)
    contexts = torch.randn(opts.images, 1, prompt_tokens, text, generator=g)
    pooled = torch.randn(opts.images, 1, pooled_width, generator=g)
    entities = torch.randn(opts.images, 2, 1, entity_tokens, text, generator=g)
    masks = torch.zeros(opts.images, 2, side, side)
    masks[:, 0, : side // 2] = 1
    masks[:, 1, side // 3:, side // 3:] = 1
    return model, latents, contexts, pooled, entities, masks


def run_builtin(opts, model, latents, contexts, pooled, checkpointing, stamps):
    import torch
    import comfy_extras.nodes_train
    from comfy_extras.nodes_train import TrainLoraNode

    fwd_bwd = comfy_extras.nodes_train.TrainSampler.fwd_bwd

    def timed(self, *args, **kwargs):  # one call per (micro-)step: record when each one ends
        out = fwd_bwd(self, *args, **kwargs)
        stamps.append(time.perf_counter())
        return out

    comfy_extras.nodes_train.TrainSampler.fwd_bwd = timed

    dtype = "bf16" if opts.real_widths else "fp32"
    with torch.inference_mode():  # nodes run like this in ComfyUI
        TrainLoraNode.execute(
            [model], [{"samples": latents[i:i + 1]} for i in range(len(latents))],
            [[[contexts[i], {"pooled_output": pooled[i]}]] for i in range(len(latents))],
            [opts.batch], [opts.steps], [1], [opts.lr], [opts.rank], ["AdamW"], ["MSE"], [0], [dtype],
            ["fp32"], ["LoRA"], [checkpointing], ["[None]"])


def our_samples(latents, contexts, pooled, entities, masks, with_entities):
    from comfyui_eligen.training.sample import Sample

    return [Sample(latents[i], contexts[i], pooled[i], list(entities[i]) if with_entities else [],
                   masks[i] if with_entities else masks[i][:0]) for i in range(len(latents))]


def run_ours(opts, model, samples, checkpointing, stamps=None):
    from comfyui_eligen.training.lora import LoraSettings
    from comfyui_eligen.training.hooks import Hooks
    from comfyui_eligen.training.loop import TrainingData, train
    from comfyui_eligen.training.settings import TrainSettings

    lora = LoraSettings(rank=opts.rank, alpha=float(opts.rank), preset="custom", custom_pattern=".+")
    settings = TrainSettings(steps=opts.steps, learning_rate=opts.lr, batch_size=opts.batch,
                             precision="bf16" if opts.real_widths else "fp32",
                             gradient_checkpointing=checkpointing, timestep_sampling="uniform")
    progress = None if stamps is None else (lambda *a: stamps.append(time.perf_counter()))
    train(model, TrainingData(samples), lora, settings, hooks=Hooks(progress=progress))


def run_epoch(opts, cached):
    """One epoch on the toy world: encode a folder dataset (cache empty or warm), then train over it."""
    import tempfile

    import numpy as np
    from PIL import Image

    from comfyui_eligen.toyworld.models import load_toy_models
    from comfyui_eligen.training.cache import EncodingCache, encode_dataset
    from comfyui_eligen.training.dataset import load_dataset

    model, clip, vae = load_toy_models("flux", "random")
    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        records = []
        for i in range(opts.images):
            side = opts.size or 128
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(f"{folder}/{i}.png")
            mask = np.zeros((side, side), np.uint8)
            mask[: side // 2] = 255
            Image.fromarray(mask).save(f"{folder}/{i}_m.png")
            records.append({"image": f"{i}.png", "prompt": "a red circle", "eligen_entity_prompts": ["red circle"],
                            "eligen_entity_masks": [f"{i}_m.png"]})
        with open(f"{folder}/metadata.json", "w") as handle:
            json.dump(records, handle)
        dataset = load_dataset(folder)
        cache = EncodingCache(None)
        if cached:
            encode_dataset(dataset, vae, clip, latent_format=model, cache=cache)
        started = time.perf_counter()
        samples = encode_dataset(dataset, vae, clip, latent_format=model, cache=cache)
        run_ours(argparse.Namespace(**{**vars(opts), "steps": max(1, opts.images // opts.batch)}), model,
                 samples, checkpointing=False)
        return time.perf_counter() - started


def resident_bytes():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(opts):
    import torch

    torch.set_num_threads(opts.threads)
    cuda = opts.device == "cuda"
    before = resident_bytes()
    if opts.config.startswith("epoch_"):
        seconds = run_epoch(opts, cached=opts.config == "epoch_cached")
        steps = max(1, opts.images // opts.batch)
    else:
        model, latents, contexts, pooled, entities, masks = build(opts)
        before = resident_bytes()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        stamps = []
        if opts.config.startswith("builtin"):
            run_builtin(opts, model, latents, contexts, pooled, opts.config.endswith("ckpt"), stamps)
        else:
            samples = our_samples(latents, contexts, pooled, entities, masks, "entities" in opts.config)
            run_ours(opts, model, samples, opts.config.endswith("ckpt"), stamps)
        if cuda:
            torch.cuda.synchronize()
        # Steady state: the median time between consecutive steps (set-up and the first step excluded).
        seconds = statistics.median(b - a for a, b in zip(stamps, stamps[1:])) * len(stamps)
        steps = len(stamps)
    if cuda:  # peak allocated during training (the model's weights included)
        memory = torch.cuda.max_memory_allocated()
    else:  # peak resident set above what the process held before training started
        memory = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
    print("RESULT " + json.dumps({"config": opts.config, "seconds_per_step": seconds / steps,
                                  "training_memory_mb": memory / 2**20}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--real-widths", action="store_true", help="FLUX.1 block widths at 1024 px (use with cuda)")
    parser.add_argument("--double", type=int, default=2, help="double blocks with --real-widths")
    parser.add_argument("--single", type=int, default=4, help="single blocks with --real-widths")
    parser.add_argument("--size", type=int, default=None, help="image side (default 128 toy, 1024 real widths)")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in each child")
    parser.add_argument("--config", help=argparse.SUPPRESS)  # internal: run one configuration
    opts = parser.parse_args()
    setup_comfy(opts.device)
    if opts.config:
        return child(opts)

    configs = CONFIGS + ([] if opts.real_widths else EPOCH_CONFIGS)
    results = {}
    for config in configs:
        command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--config", config]
        done = subprocess.run(command, capture_output=True, text=True)
        line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
        if done.returncode != 0 or not line:
            results[config] = {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
            continue
        results[config] = json.loads(line[0][len("RESULT "):])
        del results[config]["config"]

    def ratio(a, b, key):
        if key in results.get(a, {}) and key in results.get(b, {}):
            return round(results[a][key] / results[b][key], 3)
        return None

    summary = {
        "bench": "training", "device": opts.device, "real_widths": opts.real_widths,
        "model": (f"FLUX.1 widths, {opts.double}+{opts.single} blocks, {opts.size or 1024}px" if opts.real_widths
                  else f"toy FLUX (hidden 128, 2+2 blocks), {opts.size or 128}px"),
        "images": opts.images, "batch": opts.batch, "steps": opts.steps, "rank": opts.rank,
        "results": results,
        # builtin without checkpointing fails on FLUX in 0.3.75 (in-place blocks), so the baseline is the
        # built-in node with its checkpointing on (which runs, with wrong gradients).
        "step_time_vs_builtin_ckpt": {c: ratio(c, "builtin_ckpt", "seconds_per_step") for c in CONFIGS[2:]},
        "training_memory_vs_builtin_ckpt": {c: ratio(c, "builtin_ckpt", "training_memory_mb") for c in CONFIGS[2:]},
        "checkpointing_step_time_ratio": ratio("ours_entities_ckpt", "ours_entities", "seconds_per_step"),
        "checkpointing_memory_ratio": ratio("ours_entities_ckpt", "ours_entities", "training_memory_mb"),
        "entities_vs_plain_step_time_ratio": ratio("ours_entities", "ours_plain", "seconds_per_step"),
        "cached_epoch_time_ratio": ratio("epoch_cached", "epoch_uncached", "seconds_per_step"),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
