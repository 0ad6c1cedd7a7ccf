"""Pretrain the toy base model on global captions only (no entity prompts, no masks) and write the
shipped weights file.

    .venv/bin/python scripts/toyworld.py build-weights            # flux, 1200 steps x batch 64
        measured: 1686 s of training (28 min, 1 thread, on a 2-core machine shared with other jobs),
        loss 1.057 -> 0.029; the shipped file's metadata ("toy_world") records the recipe and time
    .venv/bin/python scripts/toyworld.py build-weights --family qwen_image --steps 600
        measured: 252 s (1 thread, machine otherwise idle), loss 1.057 -> 0.043
    .venv/bin/python scripts/toyworld.py build-weights --steps 3 --batch 4 --pool 16 --out t.safetensors

Deterministic: every random draw comes from generators seeded by --seed, the data are pure functions
of (split, seed, index), and torch runs with deterministic algorithms. The same torch version, thread
count and CPU give bit-identical weights.

Recipe (from the feasibility run in the project notes): rectified-flow velocity target, sigma =
sigmoid(randn), MSE; AdamW, linear warm-up then cosine decay; gradient clipping; 10% of the steps use
the empty caption so classifier-free guidance has an unconditional model to work with.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..core import blocks, host
from ..core.adapters import adapter_for
from ..core.files import atomic_path
from ..toyworld import data, models

DEFAULTS = dict(steps=1200, batch=64, lr=1e-3, min_lr=1e-4, warmup=100, pool=8192, seed=0,
                caption_dropout=0.1, weight_decay=0.01, clip=1.0)


def batch_arrays(split, seed, indices, size=data.SIZE):
    """(images uint8 [B, H, W, 3], captions) for pretraining: global captions only, no entity data."""
    items = [data.make_layout(split, seed, int(i), size) for i in indices]
    return np.stack([item.image for item in items]), [item.caption for item in items]


def learning_rate(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


class CaptionPool:
    """Pretraining data held in memory: model-space latents and encoded captions, grouped by caption
    length so a batch stacks without padding (sampling sees unpadded captions too)."""

    def __init__(self, model, clip, vae, size, seed, log, image_size=data.SIZE):
        started = time.time()
        self.latents, self.contexts, self.pooled, self.groups = [], {}, {}, {}
        chunk = 512
        for start in range(0, size, chunk):
            indices = range(start, min(size, start + chunk))
            images, captions = batch_arrays("train", seed, indices, image_size)
            pixels = torch.from_numpy(images).float() / 255.0
            self.latents.append(model.model.process_latent_in(vae.encode(pixels)))
            for index, caption in zip(indices, captions):
                context, pooled = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
                self.contexts[index], self.pooled[index] = context[0], pooled[0]
                self.groups.setdefault(context.shape[1], []).append(index)
        self.latents = torch.cat(self.latents)
        empty_context, empty_pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
        self.empty = (empty_context[0], empty_pooled[0])
        self.lengths = sorted(self.groups)
        self.weights = torch.tensor([len(self.groups[n]) for n in self.lengths], dtype=torch.float64)
        log(f"data: {size} train layouts of {image_size} px encoded in {time.time() - started:.1f} s; "
            f"caption lengths {self.lengths[0]}-{self.lengths[-1]} tokens")

    def batch(self, batch_size, generator, unconditional):
        group = self.groups[self.lengths[int(torch.multinomial(self.weights, 1, generator=generator))]]
        picks = torch.randint(len(group), (batch_size,), generator=generator)
        indices = [group[int(i)] for i in picks]
        x0 = self.latents[indices]
        # Mirror images: captions say nothing about position, so flips are free extra layouts.
        flips = torch.rand(batch_size, 2, generator=generator) < 0.5
        x0 = torch.where(flips[:, 0].view(-1, *[1] * (x0.ndim - 1)), x0.flip(-1), x0)
        x0 = torch.where(flips[:, 1].view(-1, *[1] * (x0.ndim - 1)), x0.flip(-2), x0)
        if unconditional:
            context = self.empty[0].expand(batch_size, -1, -1)
            pooled = self.empty[1].expand(batch_size, -1)
        else:
            context = torch.stack([self.contexts[i] for i in indices])
            pooled = torch.stack([self.pooled[i] for i in indices])
        return x0, context, pooled


def pretrain(args, log=print):
    """Train the base model; returns (ModelPatcher, CLIP, VAE, info dict). Torch's global settings
    (deterministic algorithms, thread count) are restored afterwards."""
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _pretrain(args, log)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def _pretrain(args, log):
    device = torch.device(args.device)

    spec = models.family_spec(args.family)
    if args.init:  # fine-tune a built base (e.g. at another token grid: FLUX/Qwen positions are RoPE)
        model, clip, vae = models.load_toy_models(args.family, "pretrained", weights_file=args.init, pool=args.vae_pool)
    else:
        model, clip, vae = models.load_toy_models(args.family, "random", seed=args.seed, pool=args.vae_pool)
        models.init_weights(model.model.diffusion_model, args.seed, spec["zero_init"])
    base_model = model.model
    # One pool per image size; steps take the sizes in turn, so one base serves every token grid
    # (as FLUX itself is trained at several resolutions; its positions are RoPE).
    sizes = [int(s) for s in str(args.sizes).split(",")]
    with torch.inference_mode(False):
        pools = [CaptionPool(model, clip, vae, args.pool, args.seed, log, size) for size in sizes]

    adapter = adapter_for(base_model)
    diffusion_model = base_model.diffusion_model.to(device)
    diffusion_model.train()
    parameters = [p for p in diffusion_model.parameters()]
    for p in parameters:
        p.requires_grad_(True)
    options = blocks.training_transformer_options(diffusion_model, adapter.training_blocks, {}, checkpointing=False)
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)

    log(f"pretraining toy {args.family}: {sum(p.numel() for p in parameters) / 1e6:.2f}M parameters, "
        f"{args.steps} steps x batch {args.batch}, {torch.get_num_threads()} threads on {device}")
    started = time.time()
    losses = []
    with torch.inference_mode(False):
        for step in range(args.steps):
            unconditional = bool(torch.rand(1, generator=generator) < args.caption_dropout)
            x0, context, pooled = pools[step % len(pools)].batch(args.batch, generator, unconditional)
            noise = torch.randn(x0.shape, generator=generator)
            sigma = torch.sigmoid(torch.randn(args.batch, generator=generator))
            s = sigma.view(-1, *[1] * (x0.ndim - 1))
            x_t = ((1 - s) * x0 + s * noise).to(device)
            target = (noise - x0).to(device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, args)
            prediction = adapter.training_forward(
                base_model, x_t, sigma.to(device), context.to(device), pooled.to(device), None, options)
            loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, args.clip)
            optimizer.step()
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise RuntimeError(f"pretraining diverged at step {step}: loss {losses[-1]}")
            if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
                elapsed = time.time() - started
                recent = sum(losses[-args.log_every:]) / len(losses[-args.log_every:])
                log(f"step {step + 1}/{args.steps}  loss {recent:.4f}  lr {learning_rate(step, args):.2e}  "
                    f"{elapsed:.0f} s, about {elapsed / (step + 1) * (args.steps - step - 1):.0f} s left")
    seconds = time.time() - started
    diffusion_model.eval().requires_grad_(False).to("cpu")
    info = {
        "family": args.family, "steps": args.steps, "batch": args.batch, "lr": args.lr, "min_lr": args.min_lr,
        "warmup": args.warmup, "pool": args.pool, "seed": args.seed, "text_seed": args.seed,
        "caption_dropout": args.caption_dropout, "seconds": round(seconds, 1), "threads": torch.get_num_threads(),
        "first_loss": losses[0], "final_loss": sum(losses[-50:]) / len(losses[-50:]), "torch": torch.__version__,
        "unet_config": spec["unet_config"], "losses_every_10": losses[::10], "vae_pool": args.vae_pool, "image_sizes": sizes,
        "init": os.path.basename(args.init) if args.init else None,
        "init_recipe": init_recipe(args.init) if args.init else None,
    }
    return model, clip, vae, info


def init_recipe(path):
    """The recipe recorded in a weights file this one was fine-tuned from (so the chain back to the
    from-scratch pretraining stays in the shipped file), or None when it records none."""
    with safe_open(path, framework="pt") as f:
        recorded = (f.metadata() or {}).get("toy_world")
    return json.loads(recorded) if recorded else None


def save_weights(path, model, clip, info):
    """Atomic safetensors write: diffusion_model.* + text_encoder.*, recipe in the metadata."""
    text_encoder = host.encoders.text_encoder_module(clip)
    tensors = {f"diffusion_model.{k}": v.detach().contiguous().cpu() for k, v in model.model.diffusion_model.state_dict().items()}
    tensors.update({f"text_encoder.{k}": v.detach().contiguous().cpu() for k, v in text_encoder.state_dict().items()})
    with atomic_path(path) as temp:
        save_file(tensors, temp, metadata={"toy_world": json.dumps(info)})
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Pretrain the toy-world base model (global captions only).")
    parser.add_argument("--family", default="flux", choices=sorted(models.FAMILIES))
    for name, value in DEFAULTS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: deterministic, and on a busy 2-core machine 1 thread "
                        "ran ~5x faster than 2; 0 = torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vae-pool", type=int, default=models.POOL,
                        help="toy VAE downscale factor (8 = FLUX geometry, 8x8 tokens at 128 px; 4 = 16x16 tokens)")
    parser.add_argument("--sizes", default=str(data.SIZE),
                        help="comma-separated image sizes in px, used in turn step by step (e.g. 256,128: "
                        "16x16 and 8x8 tokens with the 8x VAE)")
    parser.add_argument("--init", help="start from this toy weights file instead of a fresh init (fine-tune)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--out", help="output file (default: toyworld/weights/<family file>)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    log = lambda message: print(f"[build_weights] {message}", flush=True)
    model, clip, _, info = pretrain(args, log)
    path = save_weights(args.out or models.weights_path(args.family), model, clip, info)
    log(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB) after {info['seconds']:.0f} s of training; "
        f"loss {info['first_loss']:.3f} -> {info['final_loss']:.3f}")
    return path


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
