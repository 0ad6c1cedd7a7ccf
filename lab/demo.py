"""The toy-world demo (README command 1): the whole EliGen job on a CPU in minutes.

    bash scripts/demo.sh [--out demo_out] [--layouts 16]

Starts a headless ComfyUI with this package and runs four of the toy templates with `comfy run` - (a)
base, (b) base + EliGen attention, (c) write the synthetic training set into the input folder and train an
EliGen LoRA in-process, (d) LoRA + EliGen attention - and writes into --out:

    contact_sheet.png   rows a, b, d (and the layouts drawn exactly); columns: held-out layouts,
                        entity masks outlined
    loss.png            the LoRA training loss
    report.md, report.json   placement figures of a, b and d, timings
    workflows/          the API graphs that ran; images/ the generated images
"""

import argparse
import glob
import json
import math
import os
import shutil
import time

import numpy as np
from PIL import Image

from ..core.files import write_text
from ..core.lora_formats import load_lora_metadata
from ..toyworld import data, files, metric, models
from . import cli, evaluate, figures, workflows


class Clock:
    def __init__(self):
        self.started = time.monotonic()
        self.stages = {}

    def log(self, message):
        print(f"[demo {time.monotonic() - self.started:6.1f} s] {message}", flush=True)

    def stage(self, name, seconds):
        self.stages[name] = round(seconds, 1)


def newest(pattern):
    found = sorted(glob.glob(pattern))
    if not found:
        raise RuntimeError(f"the workflow wrote no file matching {pattern}")
    return found[-1]


def server_threads():
    """Every core unless other work keeps them busy (1-minute load average of cores - 0.5 or more: then
    one thread, since oversubscribed threads make the tiny model's steps many times slower). Set-up
    itself leaves a load of about 1 behind, which still counts as free on 2 cores."""
    cores = os.cpu_count() or 1
    return cores if os.getloadavg()[0] < cores - 0.5 else 1


def run_condition(server, condition, path, clock, timeout):
    started = time.monotonic()
    what = workflows.CONDITIONS.get(condition, "train the EliGen LoRA in ComfyUI (EliGenTrain)")
    clock.log(f"({condition}) {what}: comfy run {os.path.basename(path)}")
    server.comfy_run(path, timeout=timeout)
    clock.stage(condition, time.monotonic() - started)


def collect_condition(server, condition, count):
    """(metric result, images) written by a sampling workflow."""
    folder = os.path.join(server.output_dir, "eligen_toy")
    result = json.load(open(newest(os.path.join(folder, f"{condition}_*_.json"))))
    names = sorted(glob.glob(os.path.join(folder, f"{condition}_*_.png")))[-count:]
    if len(names) != count:
        raise RuntimeError(f"({condition}) wrote {len(names)} images, expected {count}")
    return result, [np.asarray(Image.open(name).convert("RGB")) for name in names], names


def training_summary(lora_path):
    """The trainer's record in the LoRA's safetensors metadata (eligen_training)."""
    info = load_lora_metadata(lora_path).get("eligen_training", {})
    return info if isinstance(info, dict) else json.loads(info)


def write_report(out, figures_by_condition, layouts, clock, train_info):
    entities = sum(len(layout.entities) for layout in layouts)
    lines = ["# EliGen toy-world demo", "",
             f"{len(layouts)} held-out layouts ({entities} entities), {layouts[0].image.shape[1]}x{layouts[0].image.shape[0]}, Euler "
             f"{evaluate.SAMPLER['steps']} steps, cfg {evaluate.SAMPLER['cfg']}.", "",
             "| condition | mean IoU | success (IoU > 0.5) | colour outside mask | entity missing |",
             "|---|---|---|---|---|"]
    rows = [(text, figures_by_condition[name]) for name, text in evaluate.REFERENCES.items()]
    rows += [(f"({condition}) {text}", figures_by_condition[condition]) for condition, text in workflows.CONDITIONS.items()]
    for label, s in rows:
        leak = "-" if s["mean_leak"] is None or math.isnan(s["mean_leak"]) else f"{s['mean_leak']:.2f}"
        lines.append(f"| {label} | {s['mean_iou']:.3f} | {100 * s['success_rate']:.1f}% | "
                     f"{leak} | {100 * s['missing_rate']:.1f}% |")
    lines += ["", "Wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in clock.stages.items()), "",
              "![contact sheet](contact_sheet.png)", "", "![loss](loss.png)", ""]
    write_text(os.path.join(out, "report.md"), "\n".join(lines))
    files.write_json(os.path.join(out, "report.json"), {
        "layouts": len(layouts), "entities": entities, "sampler": evaluate.SAMPLER,
        "conditions": figures_by_condition, "stages_seconds": clock.stages, "training": train_info})


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run the EliGen toy-world demo in a headless ComfyUI.")
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--layouts", type=int, default=16, help="held-out layouts per condition")
    parser.add_argument("--layout-seed", type=int, default=0)
    cli.add_size_argument(parser)
    parser.add_argument("--train-count", type=int, default=evaluate.TRAIN_DEFAULTS["count"], help="synthetic training layouts")
    parser.add_argument("--train-steps", type=int, default=evaluate.TRAIN_DEFAULTS["steps"])
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per workflow")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of the ComfyUI server; 0 (default): every core unless other work keeps "
                        "them busy, else 1 (on a busy 2-core machine 2 threads ran up to 50x slower; on an idle one "
                        "they train the 256-token toy model about 2x faster)")
    args = parser.parse_args(argv)
    clock = Clock()
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "workflows"), exist_ok=True)
    if not os.path.exists(models.weights_path("flux")):
        raise SystemExit("toyworld/weights/toy_flux_base.safetensors is missing: "
                         "run `.venv/bin/python scripts/toyworld.py build-weights` first")

    server_module = workflows.load_server_class()
    threads = args.threads or server_threads()
    clock.log(f"ComfyUI runs torch on {threads} thread(s)")
    server = server_module.ComfyServer(log_path=os.path.join(out, "comfyui.log"), torch_threads=threads)
    clock.log("starting ComfyUI headless (log: comfyui.log)")
    server.start()
    try:
        server.check_nodes_loaded(server_module.expected_node_ids("comfyui_eligen"))
        clock.log(f"ComfyUI ready in {server.start_seconds:.1f} s at {server.url}")

        graphs = {c: workflows.sampling_workflow(c, args.layouts, args.layout_seed, size=args.size)
                  for c in workflows.CONDITIONS}
        # (c) writes its synthetic training set into input/ itself (EliGen Toy Dataset), as the template does
        graphs["c"] = workflows.training_workflow(seed=args.seed, steps=args.train_steps, size=args.size,
                                                  count=args.train_count)
        paths = {}
        for condition, graph in graphs.items():
            paths[condition] = os.path.join(out, "workflows", f"toyworld_{condition}.json")
            files.write_json(paths[condition], graph)

        results, images = {}, {}
        for condition in ("a", "b", "c", "d"):
            run_condition(server, condition, paths[condition], clock, args.timeout)
            if condition == "c":
                lora_path = os.path.join(server.models_dir, "loras", workflows.LORA_NAME)
                train_info = training_summary(lora_path)
                shutil.copyfile(lora_path, os.path.join(out, workflows.LORA_NAME))
                shutil.copyfile(newest(os.path.join(server.output_dir, "eligen_toy", "c_loss_*.png")),
                                os.path.join(out, "loss.png"))
                clock.log(f"trained {workflows.LORA_NAME}: final loss {train_info.get('final_loss', float('nan')):.4f}")
                continue
            result, images[condition], names = collect_condition(server, condition, args.layouts)
            results[condition] = result["summary"]
            for name in names:
                target = os.path.join(out, "images", os.path.basename(name))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copyfile(name, target)
            clock.log(f"({condition}) {metric.format_summary(result['summary'])}")
    finally:
        server.stop()

    layouts = data.layouts("heldout", args.layout_seed, args.layouts, size=args.size)
    rows = [("layout (exact)", [layout.image for layout in layouts])]
    rows += [(f"({c}) {text}", images[c]) for c, text in workflows.CONDITIONS.items()]
    sheet = figures.contact_sheet(rows, [layout.masks for layout in layouts],
                                  [f"held-out {i}" for i in range(len(layouts))])
    files.save_png(sheet, os.path.join(out, "contact_sheet.png"))
    clock.stage("total", time.monotonic() - clock.started)
    # The references of evaluate.py on the same layouts: the token-fill bound and the ground-truth ceiling.
    model, _, vae = models.load_toy_models("flux", "pretrained")
    for name, result in evaluate.score_references(model, vae, layouts).items():
        results[name] = result["summary"]
    write_report(out, results, layouts, clock, train_info)
    clock.log(f"done: {out}/report.md, contact_sheet.png, loss.png (total {clock.stages['total']:.0f} s)")
    return True
