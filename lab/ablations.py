"""Recipe ablations in the toy world: one training setting changed at a time against the toy recipe.

Every variant trains its own EliGen LoRA per seed (same training layouts, same seed as the baseline) and
samples the same held-out layouts with the same noise, so differences are paired: the table gives each
variant's (d) figures and its change in success against the baseline with a 95% interval from a paired
bootstrap over layouts (seeds pooled).

    .venv/bin/python scripts/toyworld.py ablations --family flux --seeds 0 1 2 --size 128 --out abl_flux.json

The JSON is written after every run and read back on start, so an interrupted run resumes where it stopped.
"""

import argparse
import json
import os
import time

import numpy as np

from ..core import host
from ..core.files import write_text
from ..toyworld import data, files, metric
from . import cli, evaluate

# name -> (factor, overrides of the toy recipe: evaluate.TRAIN_DEFAULTS / TRAIN_FIXED / TrainSettings /
# LoraSettings fields). The first entry is the baseline every other one is compared with.
VARIANTS = {
    "baseline": ("toy recipe", {}),
    "timesteps_reference": ("timestep sampling", {"timestep_sampling": "reference"}),
    "timesteps_uniform": ("timestep sampling", {"timestep_sampling": "uniform"}),
    "entity_weight_1": ("entity_weight", {"entity_weight": 1.0}),
    "rank_4": ("rank", {"rank": 4}),
    "rank_16": ("rank", {"rank": 16}),
    "preset_eligen": ("target preset", {"preset": "eligen"}),
    "preset_attention": ("target preset", {"preset": "attention"}),
    "entity_dropout_0.1": ("entity dropout", {"entity_dropout": 0.1}),
    "steps_100": ("steps", {"steps": 100}),
    "steps_400": ("steps", {"steps": 400}),
}
BOOTSTRAP = dict(samples=2000, seed=0)


def baseline_text(train_settings):
    recipe = dict(train_settings, **evaluate.TRAIN_FIXED)
    return ", ".join(f"{k} {v}" for k, v in recipe.items() if k not in ("count", "size")) + \
        f", {recipe['count']} training layouts"


def run_variant(name, seed, layouts, model, clip, vae, train_settings, sampler, log):
    """Train the variant's LoRA for one seed and score (d) on `layouts`."""
    overrides = VARIANTS[name][1]
    settings = dict(train_settings, **overrides)
    lora, losses, seconds = evaluate.train_lora(model, clip, vae, seed=seed, data_seed=seed, log=None, **settings)
    result, _ = evaluate.score_condition(host.weights.apply_lora(model, lora), clip, vae, layouts, True, seed, sampler)
    log(f"{name} seed {seed}: {metric.format_summary(result['summary'])} (trained in {seconds:.0f} s)")
    return {"variant": name, "seed": seed, "train_seconds": round(seconds, 1),
            "final_loss": float(np.mean([v for _, v in losses[-20:]])), "summary": result["summary"],
            "success": [[bool(r["success"]) for r in rs] for rs in result["images"]],
            "iou": [[float(r["iou"]) for r in rs] for rs in result["images"]]}


def paired_difference(runs, name, seeds, figure="success", samples=BOOTSTRAP["samples"], seed=BOOTSTRAP["seed"]):
    """(mean change of `figure` ("success" rate or "iou") against the baseline, 95% interval): bootstrap
    over layouts, the same resampled layouts for both, entities pooled over seeds."""
    def per_layout(variant):
        by_seed = {r["seed"]: r for r in runs if r["variant"] == variant}
        values = [[sum(map(float, image)) for image in by_seed[k][figure]] for k in seeds]
        counts = [[len(image) for image in by_seed[k][figure]] for k in seeds]
        return np.array(values), np.array(counts, float)

    values, counts = per_layout(name)
    base_values, _ = per_layout("baseline")
    layouts = values.shape[1]
    rng = np.random.default_rng(seed)
    picks = rng.integers(layouts, size=(samples, layouts))
    total = counts[:, picks].sum(axis=(0, 2))
    diffs = (values[:, picks].sum(axis=(0, 2)) - base_values[:, picks].sum(axis=(0, 2))) / total
    mean = (values.sum() - base_values.sum()) / counts.sum()
    return float(mean), (float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975)))


def table(runs, seeds):
    """Markdown rows: factor, variant, (d) IoU and success (mean ± std over seeds), their paired change
    against the baseline, training time. Only variants run for every seed are listed."""
    lines = ["| factor | variant | (d) mean IoU | (d) success | IoU vs baseline [95%] | success vs baseline [95%] | train s |",
             "|---|---|---|---|---|---|---|"]
    done = [name for name in VARIANTS if {r["seed"] for r in runs if r["variant"] == name} >= set(seeds)]
    for name in done:
        rows = [r for r in runs if r["variant"] == name and r["seed"] in seeds]
        iou = [r["summary"]["mean_iou"] for r in rows]
        success = [r["summary"]["success_rate"] for r in rows]
        iou_change = success_change = "-"
        if name != "baseline" and "baseline" in done:
            mean, (low, high) = paired_difference(runs, name, seeds, "iou")
            iou_change = f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"
            mean, (low, high) = paired_difference(runs, name, seeds, "success")
            success_change = f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"
        lines.append(f"| {VARIANTS[name][0]} | {name} | {np.mean(iou):.3f} ± {np.std(iou):.3f} | "
                     f"{100 * np.mean(success):.1f}% ± {100 * np.std(success):.1f} | {iou_change} | {success_change} | "
                     f"{np.mean([r['train_seconds'] for r in rows]):.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_run_arguments(parser, seeds=[0, 1, 2], layouts=32)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--join", nargs="*", default=[], metavar="JSON",
                        help="runs written by other ablation processes with the same settings (e.g. one seed each) "
                        "to add to this one's table and --out")
    args = parser.parse_args(argv)
    train_settings, sampler = cli.run_settings(args)
    log = lambda message: print(f"[ablations] {message}", flush=True)
    model, clip, vae = cli.load_run_models(args)
    layouts = data.layouts("heldout", args.layout_seed, args.layouts, size=args.size)
    payload = {"family": args.family, "size": args.size, "layouts": args.layouts, "layout_seed": args.layout_seed,
               "train": train_settings, "fixed": evaluate.TRAIN_FIXED, "sampler": sampler, "runs": []}
    same = ("family", "size", "layouts", "layout_seed", "train", "sampler")
    if args.out and os.path.exists(args.out):
        with open(args.out) as f:
            previous = json.load(f)
        different = [k for k in same if previous.get(k) != payload[k]]
        if different:  # never overwrite runs measured with other settings
            raise SystemExit(f"--out {args.out} holds runs whose {', '.join(different)} differ from this run's; "
                             "choose another --out")
        payload["runs"] = previous["runs"]
        log(f"resuming: {len(payload['runs'])} runs already in {args.out}")
    for path in args.join:
        with open(path) as f:
            other = json.load(f)
        different = [k for k in same if other.get(k) != payload[k]]
        if different:
            raise SystemExit(f"--join {path}: its {', '.join(different)} differ from this run's")
        payload["runs"] += [r for r in other["runs"]
                            if not any(r["variant"] == q["variant"] and r["seed"] == q["seed"] for q in payload["runs"])]
    started = time.time()
    for seed in args.seeds:
        for name in ["baseline"] + [v for v in args.variants if v != "baseline"]:
            if any(r["variant"] == name and r["seed"] == seed for r in payload["runs"]):
                continue
            payload["runs"].append(run_variant(name, seed, layouts, model, clip, vae, train_settings, sampler, log))
            payload["seconds"] = round(time.time() - started, 1)
            if args.out:
                files.write_json(args.out, payload)
    if args.out:  # also when everything came from --join or an earlier run
        files.write_json(args.out, payload)
    text = table(payload["runs"], args.seeds)
    print(text)
    if args.markdown:
        write_text(args.markdown, f"Toy {args.family}, {args.size} px, baseline: {baseline_text(train_settings)}.\n\n{text}\n")
    return payload
