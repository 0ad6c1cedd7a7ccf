"""What the default max_vram_gb (automatic) chooses on 12 / 16 / 24 GB cards, for full-size FLUX.1 and
Qwen-Image with bf16 and fp8 base weights: the trainer's own budget and plan (training/offload.py:
``automatic_budget``, ``plan_memory``) for models built on the meta device, so it runs on the CPU in a
minute and computes nothing. The settings are the memory benchmark's (bench/bench_memory.py: 1024 px,
batch 1, 4 entities, rank 16, eligen targets, bf16 autocast, gradient checkpointing).

    python bench/vram_plan.py [--cards 12,16,24] [--json]

Prints a Markdown table (docs/training.md), or one JSON line with --json. A card's size is taken as that
many GiB; real cards report up to ~0.3 GiB less, and the budget follows what the card reports.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_memory  # noqa: E402

GIB = 2 ** 30
NAMES = {"flux": "FLUX.1", "qwen_image": "Qwen-Image"}


def automatic_plans(cards, opts):
    """[{card, family, weights, plan fields}] for every card size (GiB), family and base dtype."""
    from comfyui_eligen.training import offload

    rows = []
    for family in bench_memory.FAMILIES:
        for weights in ("fp8", "bf16"):
            base = bench_memory.meta_model(opts, family, weights)
            for card in cards:
                budget = offload.automatic_budget(int(card * GIB), f"a {card:g} GB card")
                plan = bench_memory.training_plan(opts, family, base, budget)
                estimate = plan.estimate
                rows.append({
                    "card_gb": card, "family": family, "weights": weights,
                    "budget_gib": round(budget.bytes / GIB, 2),
                    "blocks_swapped": plan.count, "blocks": plan.total_blocks, "fits": plan.fits,
                    "estimated_peak_gib": round(estimate.device_bytes(plan.positions) / GIB, 2),
                    "no_limit_gib": round(estimate.device_bytes([]) / GIB, 2),
                    "streamed_gib_per_pass": round(sum(estimate.block_bytes[i] for i in plan.positions) / GIB, 2),
                    "log": offload.describe(plan),
                })
    return rows


def markdown(rows):
    lines = ["| card | model | base | automatic budget | blocks swapped | estimated peak | copied to the GPU per step |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["card_gb"], r["family"], r["weights"] != "fp8")):
        copied = f"2 x {r['streamed_gib_per_pass']:.1f} GiB" if r["blocks_swapped"] else "-"
        fits = "" if r["fits"] else " (does not fit)"
        lines.append(f"| {r['card_gb']:g} GB | {NAMES[r['family']]} | {r['weights']} | {r['budget_gib']:.2f} GiB | "
                     f"{r['blocks_swapped']} of {r['blocks']}{fits} | {r['estimated_peak_gib']:.1f} GiB | {copied} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cards", default="12,16,24", help="card sizes in GB (GiB), comma-separated")
    parser.add_argument("--json", action="store_true", help="one JSON line instead of the Markdown table")
    args = parser.parse_args()
    bench_memory.setup_comfy("cpu")
    opts = bench_memory.parser().parse_args(["--device", "cpu"])  # the memory benchmark's settings
    rows = automatic_plans([float(c) for c in args.cards.split(",")], opts)
    print(json.dumps({"bench": "vram_plan", "rows": rows}) if args.json else markdown(rows))


if __name__ == "__main__":
    main()
