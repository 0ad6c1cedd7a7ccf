"""Placement of (a) base, (b) base + EliGen attention, (d) base + EliGen LoRA + attention on held-out
layouts, per layout group, over several seeds (each seed: its own LoRA training run and sampling noise).

    .venv/bin/python scripts/toyworld.py compare --seeds 0 1 2 --layouts 64 --out compare.json
    .venv/bin/python scripts/toyworld.py compare --groups all --layouts 32 --seeds 0 1

Next to the conditions every group reports the token-fill bound and the ground-truth ceiling
(evaluate.py), and every figure gets a layout-level 95% bootstrap interval (layouts resampled, entities
pooled over seeds) as well as the spread over seeds. Prints one line per seed, group and condition,
then a table per group, and writes everything as JSON.
"""

import argparse
import json
import time

import numpy as np
import torch

from ..core import host
from ..core.files import write_text
from ..toyworld import files, metric
from . import cli, evaluate
from . import groups as layout_groups
from .figures import contact_sheet
from .workflows import CONDITIONS

FIGURES = ("mean_iou", "success_rate", "mean_leak", "missing_rate")
SHEET_COLUMNS = 6  # layouts per group on the contact sheet
BOOTSTRAP = dict(samples=2000, seed=0)


BOOTSTRAP_FIGURES = ("mean_iou", "success_rate")


def bootstrap_intervals(runs, samples=2000, seed=0, level=0.95):
    """Layout-level confidence intervals. runs: one per seed, each the per-image entity results of
    score_images (["images"]) on the same layouts in the same order. Each of `samples` draws picks
    layouts with replacement (numpy, seeded by `seed`; the same draw for every run) and pools their
    entities over all runs. Returns {figure: [low, high]} for mean IoU and success rate."""
    if not runs or not runs[0]:
        raise ValueError("bootstrap_intervals needs at least one run with at least one layout")
    layouts = len(runs[0])
    if any(len(run) != layouts for run in runs):
        raise ValueError(f"runs score different numbers of layouts ({[len(run) for run in runs]}); "
                         "intervals need the same layouts in every run")
    counts = np.array([sum(len(run[i]) for run in runs) for i in range(layouts)], np.float64)
    sums = {"mean_iou": np.array([sum(r["iou"] for run in runs for r in run[i]) for i in range(layouts)]),
            "success_rate": np.array([sum(bool(r["success"]) for run in runs for r in run[i])
                                      for i in range(layouts)], np.float64)}
    draws = np.random.default_rng(seed).integers(0, layouts, size=(samples, layouts))
    drawn_counts = counts[draws].sum(axis=1)
    tail = 100 * (1 - level) / 2
    intervals = {}
    for figure in BOOTSTRAP_FIGURES:
        means = sums[figure][draws].sum(axis=1) / np.maximum(drawn_counts, 1)
        intervals[figure] = [float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))]
    return intervals


def compact(per_image):
    """Per-image entity results without the prompts (what the JSON keeps for re-analysis)."""
    return [[{k: r[k] for k in ("iou", "leak", "success", "missing")} for r in results] for results in per_image]


def run_seed(seed, layout_sets, model, clip, vae, train_settings, sampler, log, sheet_images=None,
             conditions=tuple(CONDITIONS)):
    """Train one LoRA, then score every group in `conditions`. sheet_images: a dict that receives the
    first (d) images of each group, or None."""
    started = time.time()
    lora, losses, train_seconds = evaluate.train_lora(model, clip, vae, seed=seed, data_seed=seed,
                                                      log=log, **train_settings)
    trained = host.weights.apply_lora(model, lora)
    groups = {}
    for group, layouts in layout_sets.items():
        groups[group] = {}
        for condition, (model_used, use_entities) in {"a": (model, False), "b": (model, True),
                                                      "d": (trained, True)}.items():
            if condition not in conditions:
                continue
            result, images = evaluate.score_condition(model_used, clip, vae, layouts, use_entities, seed, sampler)
            groups[group][condition] = {"summary": result["summary"], "images": compact(result["images"])}
            if condition == "d" and sheet_images is not None:
                sheet_images[group] = [image[0].numpy() for image in images[:SHEET_COLUMNS]]
            log(f"seed {seed} [{group}] ({condition}) {CONDITIONS[condition]}: "
                f"{metric.format_summary(result['summary'])}")
    return {"seed": seed, "train_seconds": round(train_seconds, 1), "seconds": round(time.time() - started, 1),
            "final_loss": float(np.mean([v for _, v in losses[-20:]])), "groups": groups}


def aggregate(runs, references):
    """{group: {row: figures}}; rows: the references, then the conditions (mean and std over seeds, and
    layout-level bootstrap intervals)."""
    table = {}
    for group, group_references in references.items():
        rows = {}
        for name, result in group_references.items():
            rows[name] = {figure: {"mean": result["summary"][figure], "std": 0.0} for figure in FIGURES}
            rows[name]["interval"] = bootstrap_intervals([result["images"]], **BOOTSTRAP)
        for condition in CONDITIONS:
            row = {}
            scored = [run for run in runs if condition in run["groups"][group]]
            if not scored:
                continue
            row["seeds"] = [run["seed"] for run in scored]
            for figure in FIGURES:
                values = [run["groups"][group][condition]["summary"][figure] for run in scored]
                values = [v for v in values if v is not None and not np.isnan(v)]
                row[figure] = {"mean": float(np.mean(values)) if values else float("nan"),
                               "std": float(np.std(values)) if values else float("nan")}
            row["interval"] = bootstrap_intervals(
                [run["groups"][group][condition]["images"] for run in scored], **BOOTSTRAP)
            rows[condition] = row
        bound = rows["fill"]["mean_iou"]["mean"]
        rows["d"]["share_of_fill_iou"] = rows["d"]["mean_iou"]["mean"] / bound if bound else float("nan")
        table[group] = rows
    return table


def _row_text(label, row, spread):
    low, high = row["interval"]["mean_iou"]
    s_low, s_high = row["interval"]["success_rate"]
    iou = f"{row['mean_iou']['mean']:.3f}" + (f" ± {row['mean_iou']['std']:.3f}" if spread else "")
    success = f"{100 * row['success_rate']['mean']:.1f}%" + (f" ± {100 * row['success_rate']['std']:.1f}" if spread else "")
    leak = row["mean_leak"]["mean"]
    return (f"| {label} | {iou} [{low:.3f}, {high:.3f}] | {success} [{100 * s_low:.1f}, {100 * s_high:.1f}] | "
            f"{'-' if np.isnan(leak) else f'{leak:.2f}'} | {100 * row['missing_rate']['mean']:.1f}% |")


def markdown_table(table, seeds, counts):
    """One table per group. counts: {group: (layouts, entities)}."""
    lines = [f"Seeds {', '.join(map(str, seeds))}: mean ± std over seeds, [95% interval over layouts] "
             f"(bootstrap, {BOOTSTRAP['samples']} draws, seed {BOOTSTRAP['seed']}).", ""]
    for group, rows in table.items():
        layouts, entities = counts[group]
        lines += [f"**{group}** ({layout_groups.GROUPS[group]}): {layouts} layouts, {entities} entities; "
                  f"(d) reaches {100 * rows['d']['share_of_fill_iou']:.0f}% of the token-fill IoU.", "",
                  "| condition | mean IoU | success (IoU > 0.5) | colour outside mask | entity missing |",
                  "|---|---|---|---|---|"]
        for name, text in evaluate.REFERENCES.items():
            lines.append(_row_text(text, rows[name], spread=False))
        for condition, text in CONDITIONS.items():
            if condition in rows:
                lines.append(_row_text(f"({condition}) {text}", rows[condition], spread=len(rows[condition]["seeds"]) > 1))
        lines.append("")
    return "\n".join(lines)


def summary_table(table, counts):
    """One row per group: IoU / success of the token-fill bound, the ceiling, (a), (b) and (d) (with its
    95% layout interval) and (d)'s share of the bound's IoU."""
    def cell(row, interval=False):
        text = f"{row['mean_iou']['mean']:.2f} / {100 * row['success_rate']['mean']:.0f}%"
        if interval:
            low, high = row["interval"]["mean_iou"]
            s_low, s_high = row["interval"]["success_rate"]
            text += f" [{low:.2f}-{high:.2f} / {100 * s_low:.0f}-{100 * s_high:.0f}%]"
        return text

    lines = ["| group | layouts (entities) | token-fill bound | ceiling | (a) | (b) | (d) [95% interval] | (d) / bound IoU |",
             "|---|---|---|---|---|---|---|---|"]
    for group, rows in table.items():
        layouts, entities = counts[group]
        base = [cell(rows[c]) if c in rows else "-" for c in ("a", "b")]
        lines.append(f"| {group} | {layouts} ({entities}) | {cell(rows['fill'])} | {cell(rows['truth'])} | "
                     f"{base[0]} | {base[1]} | {cell(rows['d'], True)} | {100 * rows['d']['share_of_fill_iou']:.0f}% |")
    return "\n".join(lines)


def group_sheet(layout_sets, fill_images, d_images):
    """uint8 image: per group three rows (exact layout, token-fill bound, (d)), masks outlined."""
    parts = []
    for group, layouts in layout_sets.items():
        shown = layouts[:SHEET_COLUMNS]
        rows = [(f"{group}: layout", [layout.image for layout in shown]),
                (f"{group}: token fill", fill_images[group][:SHEET_COLUMNS]),
                (f"{group}: (d) LoRA + attention", d_images[group])]
        parts.append(np.asarray(contact_sheet(rows, [layout.masks for layout in shown])))
    width = max(part.shape[1] for part in parts)
    parts = [np.pad(part, ((0, 0), (0, width - part.shape[1]), (0, 0)), constant_values=255) for part in parts]
    return np.concatenate(parts, axis=0)


def report(path, markdown=None):
    """Tables from a JSON written by --out (the per-image figures it keeps are enough)."""
    with open(path) as f:
        payload = json.load(f)
    counts = {g: (payload["layouts"], payload["entities"][g]) for g in payload["groups"]}
    table = aggregate(payload["runs"], payload["references"])
    text = summary_table(table, counts) + "\n\n" + markdown_table(table, [run["seed"] for run in payload["runs"]], counts)
    print(text)
    if markdown:
        write_text(markdown, text)
    return table


def parse_groups(names):
    if names == ["all"]:
        return list(layout_groups.GROUPS)
    unknown = [n for n in names if n not in layout_groups.GROUPS]
    if unknown:
        raise SystemExit(f"unknown layout group(s) {unknown}; choose from {list(layout_groups.GROUPS)} or 'all'")
    return names


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_run_arguments(parser, seeds=[0, 1, 2], layouts=64)
    parser.add_argument("--groups", nargs="+", default=["easy"],
                        help=f"held-out layout groups ({', '.join(layout_groups.GROUPS)}) or 'all'")
    parser.add_argument("--base-seeds", type=int, nargs="*",
                        help="seeds that also sample (a) and (b) (default: all; they need no training, so "
                        "one seed is often enough)")
    parser.add_argument("--sheet", help="write a contact sheet (per group: layout, token fill, (d) of the "
                        "first seed) as PNG here")
    parser.add_argument("--references-only", action="store_true",
                        help="score only the token-fill bound and the ceiling (no training, no sampling)")
    parser.add_argument("--report", metavar="JSON",
                        help="only re-render the tables (to stdout and --markdown) from a JSON this command wrote")
    args = parser.parse_args(argv)
    if args.report:
        return report(args.report, args.markdown)
    train_settings, sampler = cli.run_settings(args)
    log = lambda message: print(f"[compare] {message}", flush=True)

    started = time.time()
    model, clip, vae = cli.load_run_models(args)
    groups = parse_groups(args.groups)
    layout_sets = {g: layout_groups.layouts("heldout", args.layout_seed, args.layouts, size=args.size, group=g) for g in groups}
    counts = {g: (len(ls), sum(len(l.entities) for l in ls)) for g, ls in layout_sets.items()}
    references = {g: evaluate.score_references(model, vae, ls) for g, ls in layout_sets.items()}
    for group, group_references in references.items():
        for name, result in group_references.items():
            log(f"[{group}] {evaluate.REFERENCES[name]}: {metric.format_summary(result['summary'])}")
    if args.references_only:
        payload = {"family": args.family, "vae_pool": args.vae_pool,
                   "token_grid": evaluate.token_grid(model, vae, args.size, args.size), "groups": groups,
                   "layouts": args.layouts, "layout_seed": args.layout_seed, "bootstrap": BOOTSTRAP,
                   "references": {g: {name: {"summary": r["summary"], "interval": bootstrap_intervals(
                       [r["images"]], **BOOTSTRAP)} for name, r in refs.items()} for g, refs in references.items()}}
        if args.out:
            files.write_json(args.out, payload)
        return payload
    sheet_images = {} if args.sheet else None
    base_seeds = args.seeds if args.base_seeds is None else args.base_seeds
    runs = []
    for index, seed in enumerate(args.seeds):
        conditions = tuple(c for c in CONDITIONS if c == "d" or seed in base_seeds)
        runs.append(run_seed(seed, layout_sets, model, clip, vae, train_settings, sampler, log,
                             sheet_images if index == 0 else None, conditions))
        # Written after every seed, so a run stopped early keeps what it measured.
        table = aggregate(runs, references)
        text = summary_table(table, counts) + "\n\n" + markdown_table(table, [run["seed"] for run in runs], counts)
        payload = {"family": args.family, "vae_pool": args.vae_pool, "weights_file": args.weights_file,
                   "token_grid": evaluate.token_grid(model, vae, args.size, args.size), "seeds": args.seeds,
                   "base_seeds": base_seeds, "seeds_done": [run["seed"] for run in runs], "groups": groups,
                   "layouts": args.layouts, "layout_seed": args.layout_seed,
                   "entities": {g: counts[g][1] for g in groups}, "train": train_settings, "sampler": sampler,
                   "bootstrap": BOOTSTRAP,
                   "references": {g: {name: {"summary": r["summary"], "images": compact(r["images"])}
                                      for name, r in refs.items()} for g, refs in references.items()},
                   "runs": runs, "table": table, "seconds": round(time.time() - started, 1),
                   "threads": torch.get_num_threads()}
        if args.out:
            files.write_json(args.out, payload)
        if args.markdown:
            write_text(args.markdown, text)
    if args.sheet:
        fills = {g: evaluate.reference_images(model, vae, ls[:SHEET_COLUMNS])["fill"] for g, ls in layout_sets.items()}
        files.save_png(group_sheet(layout_sets, fills, sheet_images), args.sheet)
    print(text)
    print(json.dumps({"summary": {g: {c: {f: round(table[g][c][f]["mean"], 4) for f in ("mean_iou", "success_rate")}
                                      for c in table[g] if c in ("fill", "truth", *CONDITIONS)} for g in groups},
                      "seconds": payload["seconds"]}))
    return payload
