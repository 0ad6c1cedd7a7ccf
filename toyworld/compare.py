"""Placement of (a) base, (b) base + EliGen attention, (d) base + EliGen LoRA + attention on held-out
layouts, over several seeds (each seed: its own LoRA training run and sampling noise).

    .venv/bin/python scripts/toyworld.py compare --seeds 0 1 2 --layouts 64 --out compare.json

Prints one line per seed and condition, then the mean and spread, and writes everything as JSON.
"""

import argparse
import json
import time

import numpy as np
import torch

from . import data, evaluate, files, metric, models
from .workflows import CONDITIONS

FIGURES = ("mean_iou", "success_rate", "mean_leak", "missing_rate")


def run_seed(seed, layouts, model, clip, vae, train_settings, sampler, log):
    started = time.time()
    lora, losses, train_seconds = evaluate.train_lora(model, clip, vae, seed=seed, data_seed=seed,
                                                      log=log, **train_settings)
    trained = evaluate.with_lora(model, lora)
    results = {}
    for condition, (model_used, use_entities) in {"a": (model, False), "b": (model, True),
                                                  "d": (trained, True)}.items():
        result, _ = evaluate.score_condition(model_used, clip, vae, layouts, use_entities, seed, sampler)
        results[condition] = result["summary"]
        log(f"seed {seed} ({condition}) {CONDITIONS[condition]}: {metric.format_summary(result['summary'])}")
    return {"seed": seed, "train_seconds": round(train_seconds, 1), "seconds": round(time.time() - started, 1),
            "final_loss": float(np.mean([v for _, v in losses[-20:]])), "conditions": results}


def aggregate(runs):
    table = {}
    for condition in CONDITIONS:
        table[condition] = {}
        for figure in FIGURES:
            values = [run["conditions"][condition][figure] for run in runs]
            values = [v for v in values if v is not None and not np.isnan(v)]
            table[condition][figure] = {"mean": float(np.mean(values)) if values else float("nan"),
                                        "std": float(np.std(values)) if values else float("nan")}
    return table


def markdown_table(table, seeds, layouts, entities):
    lines = [f"Held-out layouts: {layouts} ({entities} entities), seeds {', '.join(map(str, seeds))} "
             f"(mean +- std over seeds).", "",
             "| condition | mean IoU | success (IoU > 0.5) | colour outside mask | entity missing |",
             "|---|---|---|---|---|"]
    for condition, text in CONDITIONS.items():
        row = table[condition]
        lines.append(
            f"| ({condition}) {text} | {row['mean_iou']['mean']:.3f} +- {row['mean_iou']['std']:.3f} | "
            f"{100 * row['success_rate']['mean']:.1f}% +- {100 * row['success_rate']['std']:.1f} | "
            f"{row['mean_leak']['mean']:.2f} | {100 * row['missing_rate']['mean']:.1f}% |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="flux", choices=sorted(models.FAMILIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--layouts", type=int, default=64, help="held-out layouts per seed")
    parser.add_argument("--layout-seed", type=int, default=0)
    for name, value in evaluate.TRAIN_DEFAULTS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--sample-steps", type=int, default=evaluate.SAMPLER["steps"])
    parser.add_argument("--cfg", type=float, default=evaluate.SAMPLER["cfg"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda message: print(f"[compare] {message}", flush=True)

    started = time.time()
    model, clip, vae = models.load_toy_models(args.family, "pretrained")
    layouts = data.layouts("heldout", args.layout_seed, args.layouts)
    entities = sum(len(layout.entities) for layout in layouts)
    train_settings = {name: getattr(args, name) for name in evaluate.TRAIN_DEFAULTS}
    sampler = dict(evaluate.SAMPLER, steps=args.sample_steps, cfg=args.cfg)
    runs = [run_seed(seed, layouts, model, clip, vae, train_settings, sampler, log) for seed in args.seeds]
    table = aggregate(runs)
    text = markdown_table(table, args.seeds, args.layouts, entities)
    print(text)
    payload = {"family": args.family, "seeds": args.seeds, "layouts": args.layouts, "entities": entities, "train": train_settings,
               "sampler": sampler, "runs": runs, "table": table, "seconds": round(time.time() - started, 1),
               "threads": torch.get_num_threads()}
    if args.out:
        files.write_json(args.out, payload)
    print(json.dumps({"summary": {c: {f: round(table[c][f]["mean"], 4) for f in FIGURES} for c in CONDITIONS},
                      "seconds": payload["seconds"]}))
    return payload
