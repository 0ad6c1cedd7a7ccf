"""Benchmark: training throughput on a mixed dataset, by batch size and by number of ranks (CPU).

The dataset is the toy world's with 1-6 entities per image and entity prompts and captions of varied
length (every sample has its own layout), so batches only work because samples of different layouts
share a forward (padded, training/batching.py). Every configuration runs the headless trainer's job in
its own process(es), one thread each, on the same run file:

  batch_1, batch_2, batch_4   one process, micro-batch 1, 2, 4
  ranks_1                     one process, micro-batch 2 (the same command as batch_2, measured again)
  ranks_2                     torchrun, 2 processes (gloo), micro-batch 2 each

Samples per second = samples of the global batch / median time between consecutive optimizer steps
(the first steps excluded); ratios are against batch_1 and ranks_1 measured in the same run. Each rank
counts the samples it trained in every step (``samples_per_rank``). On a machine shared with other jobs
the ranks also compete for cores, so each rank records its own CPU time too: ``own_core_samples_per_second``
= global batch / the busiest rank's median CPU seconds per step, the rate if every rank had a core to itself
(waiting in collectives costs no CPU time, so the ranks' communication is not counted there).

    .venv/bin/python bench/bench_batching.py [--steps 60] [--images 24] [--size 128]

Prints one JSON line.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
from comfy_env import setup_comfy  # noqa: E402

WARMUP_STEPS = 3
ADJECTIVES = ["small", "bright", "shiny", "flat", "big", "soft", "matte", "glossy", "tiny", "bold"]


def write_mixed_dataset(folder, images, size):
    """Toy layouts with 1-6 entities; each entity prompt and caption gets 0-5 extra words."""
    from comfyui_eligen.toyworld.data import make_layout, write_dataset
    from comfyui_eligen.toyworld.files import write_json

    write_dataset(folder, images, seed=7, size=size, make=lambda split, seed, index, size: make_layout(
        split, seed, index, size, max_entities=6))
    path = os.path.join(folder, "metadata.json")
    with open(path) as handle:
        records = json.load(handle)
    for index, record in enumerate(records):
        record["eligen_entity_prompts"] = [
            " ".join(ADJECTIVES[(index + k + j) % len(ADJECTIVES)] for j in range((index * 3 + k) % 6)) + " " + prompt
            for k, prompt in enumerate(record["eligen_entity_prompts"])]
        record["prompt"] = " ".join(ADJECTIVES[:index % 5]) + " " + record["prompt"]
    write_json(path, records)


def run_file(folder, dataset, steps):
    from comfyui_eligen.training.job import read_job
    from comfyui_eligen.training.run_file import write_run

    toy = {"loader": "EliGenToyModelLoader", "inputs": {"family": "flux", "weights": "random", "seed": 0}}
    job = read_job({"version": 1, "model": toy, "clip": toy, "vae": toy,
                    "dataset": {"folder": dataset, "max_pixels": 1 << 20},
                    "lora": {"rank": 4, "alpha": 4.0, "preset": "eligen"},
                    "train": {"steps": steps, "learning_rate": 1e-3, "batch_size": 1, "seed": 1, "precision": "fp32",
                              "gradient_checkpointing": False, "entity_dropout": 0.2, "checkpoint_every": 0},
                    "encoding": {"cache": "disk", "entity_text_length": "real_length"},
                    "output": {"lora_name": "bench"}})
    return write_run(os.path.join(folder, "run.json"), job)


def worker(options):
    """One process (or one torchrun rank): train the run file, record step times and samples trained."""
    import torch

    setup_comfy("cpu")
    torch.set_num_threads(1)
    from comfyui_eligen.toyworld.models import load_toy_models
    from comfyui_eligen.training import distributed, headless, loop
    from comfyui_eligen.training.hooks import Hooks
    from comfyui_eligen.training.outputs import folder_outputs
    from comfyui_eligen.training.run_file import load_run
    from comfyui_eligen.training.runner import JobInputs, run_job
    from dataclasses import replace

    group = distributed.init_from_environment("cpu")
    counted, stamps, cpu = [0], [], []
    trained = []
    real_loss = loop.batch_loss

    def counting_loss(model, batch, *args, **kwargs):  # the samples this rank trains, per micro-batch
        counted[0] += len(batch)
        return real_loss(model, batch, *args, **kwargs)

    def progress(step, *rest):
        stamps.append(time.monotonic())
        cpu.append(time.process_time())
        trained.append(counted[0])
        counted[0] = 0

    loop.batch_loss = counting_loss
    job = load_run(options.job)
    job = replace(job, train=replace(job.train, batch_size=options.batch))
    rank = 0 if group is None else group.rank
    folders = folder_outputs(os.path.join(options.out, f"run_{rank}"), os.path.join(options.out, "cache"))
    with torch.inference_mode():
        model, clip, vae = headless.load_components(job, {"EliGenToyModelLoader": load_toy_models})
        from comfyui_eligen.training.dataset import load_dataset
        dataset = load_dataset(job.dataset.folder, job.dataset.max_pixels)
    try:
        run_job(job, JobInputs(model, clip, vae, dataset), folders, Hooks(progress=progress), None, group)
    finally:
        if group is not None:
            group.close()
    with open(os.path.join(options.out, f"rank_{rank}.json"), "w") as handle:
        json.dump({"rank": rank, "stamps": stamps, "cpu": cpu, "samples": trained}, handle)


def load_average():
    """The 1, 5 and 15 minute load averages (other jobs on the machine change the figures)."""
    return [float(v) for v in os.getloadavg()]


def median_step(stamps):
    """Median interval between consecutive steps, the first ``WARMUP_STEPS`` left out."""
    stamps = stamps[WARMUP_STEPS - 1:]
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def measure(name, command, out, global_batch):
    os.makedirs(out, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    ranks = [json.load(open(os.path.join(out, f))) for f in sorted(os.listdir(out)) if f.startswith("rank_")]
    step = median_step(ranks[0]["stamps"])
    cpu_step = max(median_step(r["cpu"]) for r in ranks)
    per_step = [[r["samples"][i] for r in ranks] for i in range(len(ranks[0]["samples"]))]
    return {"seconds_per_step": round(step, 4), "samples_per_second": round(global_batch / step, 3),
            "cpu_seconds_per_step": round(cpu_step, 4),
            "own_core_samples_per_second": round(global_batch / cpu_step, 3),
            "samples_per_rank": [sum(r["samples"]) for r in ranks],
            "max_rank_spread_per_step": max(max(s) - min(s) for s in per_step),
            "wall_seconds": round(time.monotonic() - started, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        return worker(options)

    setup_comfy("cpu")
    load_at_start = load_average()
    folder = tempfile.mkdtemp(prefix="eligen_bench_batching_")
    dataset = os.path.join(folder, "data")
    write_mixed_dataset(dataset, options.images, options.size)
    run = run_file(folder, dataset, options.steps)
    me = [sys.executable, os.path.abspath(__file__), "--worker", "--job", run]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    configs = {"batch_1": (me, 1, 1), "batch_2": (me, 2, 1), "batch_4": (me, 4, 1),
               "ranks_1": (me, 2, 1), "ranks_2": (torchrun + me[1:], 2, 2)}
    results = {}
    for name, (command, batch, world) in configs.items():
        out = os.path.join(folder, name)
        results[name] = measure(name, command + ["--batch", str(batch), "--out", out], out, batch * world)
    for name, baseline in (("batch_2", "batch_1"), ("batch_4", "batch_1"), ("ranks_2", "ranks_1")):
        for rate in ("samples_per_second", "own_core_samples_per_second"):
            results[name][f"{rate}_ratio_vs_{baseline}"] = round(results[name][rate] / results[baseline][rate], 3)
    print(json.dumps({"bench": "batching", "steps": options.steps, "images": options.images, "size": options.size,
                      "load_average_at_start": load_at_start, "load_average_at_end": load_average(),
                      "cpus": os.cpu_count(), "results": results}))


if __name__ == "__main__":
    main()
