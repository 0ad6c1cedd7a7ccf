"""Robustness of the EliGen LoRA to a stacked style LoRA.

The style: the plain grey background becomes a vertical grey gradient (dark at the top, light at the
bottom; every grey is far from the palette, so the placement metric ignores it). The style LoRA is
trained by the same trainer (evaluate.train_lora) on captions only: the same layouts and global captions,
no entity prompts or masks. The row compares (d) base + EliGen LoRA + attention with (d) plus the
style LoRA at strength 1 on the same held-out layouts and noise, and checks that the style shows
(background brightness, bottom rows minus top rows, in (a) base + style LoRA).

    .venv/bin/python scripts/toyworld.py style --layouts 32 --seeds 0 --out style.json
"""

import argparse
import os
import time

import numpy as np

from ..core import host
from ..core.files import write_text
from ..toyworld import data, files, metric
from . import cli, evaluate

GRADIENT = (48, 208)  # background grey at the top and bottom rows
EDGE_ROWS = 1 / 8  # share of the rows at the top and bottom whose background tells whether the style shows


def styled_image(layout):
    """The layout's image with its background replaced by the gradient."""
    image = layout.image.copy()
    size = image.shape[0]
    ramp = np.linspace(GRADIENT[0], GRADIENT[1], size).round().astype(np.uint8)
    background = ~layout.masks.any(axis=0) if layout.entities else np.ones(image.shape[:2], bool)
    rows = np.broadcast_to(ramp[:, None, None], image.shape)
    image[background] = rows[background]
    return image


def write_style_dataset(folder, count, seed=0, split="train", size=data.SIZE):
    """`count` styled layouts with their global captions only (no entity prompts or masks)."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    records = []
    for i in range(count):
        layout = data.make_layout(split, seed, i, size)
        name = f"images/{i:05d}.png"
        files.save_png(styled_image(layout), os.path.join(folder, name))
        records.append({"image": name, "prompt": layout.caption})
    path = os.path.join(folder, "metadata.json")
    files.write_json(path, records)
    return path


def gradient_strength(images, layouts):
    """Mean background brightness (0-255) of the bottom EDGE_ROWS rows minus the top ones, over images;
    background = outside every mask. The style set scores GRADIENT[1] - GRADIENT[0] minus a little."""
    values = []
    for image, layout in zip(images, layouts):
        pixels = np.asarray(image, np.float64)
        pixels = pixels * 255.0 if pixels.max() <= 1.0 else pixels
        brightness = pixels.mean(axis=-1)
        background = ~layout.masks.any(axis=0) if layout.entities else np.ones(brightness.shape, bool)
        rows = max(1, round(EDGE_ROWS * brightness.shape[0]))
        top, bottom = background[:rows], background[-rows:]
        if top.any() and bottom.any():
            values.append(brightness[-rows:][bottom].mean() - brightness[:rows][top].mean())
    return float(np.mean(values)) if values else float("nan")


def run_seed(seed, layouts, model, clip, vae, train_settings, style_steps, sampler, log):
    eligen, _, eligen_seconds = evaluate.train_lora(model, clip, vae, seed=seed, data_seed=seed, log=log,
                                                    **train_settings)
    style_settings = dict(train_settings, steps=style_steps)
    style, style_losses, style_seconds = evaluate.train_lora(
        model, clip, vae, seed=seed, data_seed=seed, log=log, write_dataset=write_style_dataset, **style_settings)
    trained = host.weights.apply_lora(model, eligen)
    # (a) itself is in compare's table (same layouts and noise); here only what the style changes.
    rows = {"d": (trained, True), "d_style": (host.weights.apply_lora(trained, style), True),
            "a_style": (host.weights.apply_lora(model, style), False)}
    results = {}
    for name, (patched, use_entities) in rows.items():
        result, images = evaluate.score_condition(patched, clip, vae, layouts, use_entities, seed, sampler)
        results[name] = {"summary": result["summary"],
                         "gradient": gradient_strength([image[0].numpy() for image in images], layouts),
                         "images": [[{k: r[k] for k in ("iou", "success")} for r in rs] for rs in result["images"]]}
        log(f"seed {seed} {name}: {metric.format_summary(result['summary'])}, "
            f"gradient {results[name]['gradient']:.1f}")
    return {"seed": seed, "eligen_train_seconds": round(eligen_seconds, 1),
            "style_train_seconds": round(style_seconds, 1),
            "style_final_loss": float(np.mean([v for _, v in style_losses[-20:]])), "rows": results}


LABELS = {
    "a_style": "base + style LoRA, global caption only",
    "d": "(d) base + EliGen LoRA + EliGen attention",
    "d_style": "(d) + style LoRA at strength 1 (stacked)",
}


def markdown(runs, layouts, entities):
    lines = [f"{layouts} held-out layouts ({entities} entities), seeds {', '.join(str(r['seed']) for r in runs)}; "
             "gradient = background brightness, bottom rows minus top rows (0-255; the style set: "
             f"{GRADIENT[1] - GRADIENT[0]}).", "",
             "| condition | mean IoU | success (IoU > 0.5) | gradient |", "|---|---|---|---|"]
    for name, label in LABELS.items():
        iou = np.mean([r["rows"][name]["summary"]["mean_iou"] for r in runs])
        success = np.mean([r["rows"][name]["summary"]["success_rate"] for r in runs])
        gradient = np.mean([r["rows"][name]["gradient"] for r in runs])
        lines.append(f"| {label} | {iou:.3f} | {100 * success:.1f}% | {gradient:.0f} |")
    d = np.mean([r["rows"]["d"]["summary"]["success_rate"] for r in runs])
    stacked = np.mean([r["rows"]["d_style"]["summary"]["success_rate"] for r in runs])
    drop = (d - stacked) / d if d else float("nan")
    lines += ["", f"Drop in (d) success with the style LoRA stacked: {100 * (d - stacked):.1f} points "
              f"({100 * drop:.0f}% relative)."]
    return "\n".join(lines), drop


def main(argv=None):
    parser = argparse.ArgumentParser(description="Stacked style LoRA: (d) with and without it.")
    cli.add_run_arguments(parser, seeds=[0], layouts=32)
    parser.add_argument("--style-steps", type=int, default=evaluate.TRAIN_DEFAULTS["steps"])
    args = parser.parse_args(argv)
    train_settings, sampler = cli.run_settings(args)
    log = lambda message: print(f"[style] {message}", flush=True)
    started = time.time()
    model, clip, vae = cli.load_run_models(args)
    layouts = data.layouts("heldout", args.layout_seed, args.layouts, size=args.size)
    entities = sum(len(layout.entities) for layout in layouts)
    runs = [run_seed(seed, layouts, model, clip, vae, train_settings, args.style_steps, sampler, log)
            for seed in args.seeds]
    text, drop = markdown(runs, args.layouts, entities)
    print(text)
    payload = {"family": args.family, "vae_pool": args.vae_pool, "layouts": args.layouts, "entities": entities, "train": train_settings,
               "style_steps": args.style_steps, "sampler": sampler, "gradient": GRADIENT, "runs": runs,
               "relative_drop": drop, "seconds": round(time.time() - started, 1)}
    if args.out:
        files.write_json(args.out, payload)
    if args.markdown:
        write_text(args.markdown, text)
    return payload
