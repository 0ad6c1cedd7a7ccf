"""Command-line options the lab's runs share (compare.py, style.py, ablations.py, demo.py, groups.py)."""

import argparse

import torch

from ..toyworld import data, models
from .evaluate import SAMPLER, TRAIN_DEFAULTS


def image_side(text):
    """argparse type of an image side: a multiple of 16 px (whole 2x2 patches of the 8x VAE), 32 or more."""
    side = int(text)
    if side < 32 or side % 16:
        raise argparse.ArgumentTypeError(f"image side {side} px: must be a multiple of 16, at least 32")
    return side


def add_size_argument(parser):
    parser.add_argument("--size", type=image_side, default=data.SIZE,
                        help=f"image side in px (default {data.SIZE}: 16x16 tokens; {data.QUICK_SIZE}: 8x8 tokens, "
                        "about 4x cheaper)")


def add_run_arguments(parser, seeds, layouts):
    """The options every multi-seed toy run shares: family, seeds, held-out layouts, the training
    recipe (TRAIN_DEFAULTS), the sampler, threads and the output files."""
    parser.add_argument("--family", default="flux", choices=sorted(models.FAMILIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds)
    parser.add_argument("--layouts", type=int, default=layouts, help="held-out layouts (per group) and seed")
    parser.add_argument("--layout-seed", type=int, default=0)
    add_size_argument(parser)
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
    return models.load_toy_models(args.family, "pretrained", weights_file=args.weights_file, pool=args.vae_pool)


def run_settings(args):
    """(training settings, sampler) from add_run_arguments' options; sets torch's thread count."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return ({name: getattr(args, name) for name in TRAIN_DEFAULTS} | {"size": args.size},
            dict(SAMPLER, steps=args.sample_steps, cfg=args.cfg))
