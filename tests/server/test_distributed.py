"""Data parallel training under real torchrun (gloo, CPU processes): 2 and 3 ranks, with and without
gradient accumulation and FSDP, give the LoRA of one process with the same global batch; two "nodes"
joined by torchrun's c10d rendezvous (the multi-node command, on loopback) too; the shared encoding cache
is computed once; a rank killed with SIGKILL ends the job with one line naming it and the checkpoint,
from which one process resumes exactly; a new job in that folder without --resume is refused by every
rank."""

import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from comfyui_eligen.toyworld.data import write_dataset
from comfyui_eligen.training import checkpoints, headless
from comfyui_eligen.training.job import read_job
from comfyui_eligen.training.run_file import write_run
from shallow_toys import load_shallow_toy_models

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(TESTS)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
WORKER = os.path.join(TESTS, "support", "torchrun_worker.py")
TRAIN = os.path.join(REPO, "scripts", "train.py")


def torchrun(processes):
    return TORCHRUN + ["--standalone", "--nproc_per_node", str(processes)]


def environment():
    from conftest import comfyui_dir

    return {**os.environ, "OMP_NUM_THREADS": "1", "COMFYUI_DIR": comfyui_dir(), "PYTHONUNBUFFERED": "1"}


def one_process(job, run_dir, dtype=torch.float32, **options):
    """The headless trainer in this process on the workers' shallow toy models of ``dtype``: (TrainResult,
    LoRA path)."""
    loaders = {"EliGenToyModelLoader": functools.partial(load_shallow_toy_models, dtype=dtype)}
    done = headless.run(job, headless.Options(run_dir=run_dir, **options), loaders=loaders)
    return done.result, done.lora_path


def toy_run(dataset, family, steps=3, **train):
    toy = {"loader": "EliGenToyModelLoader", "inputs": {"family": family, "weights": "random", "seed": 0}}
    return read_job({"version": 1, "model": toy, "clip": toy, "vae": toy,
            "dataset": {"folder": dataset, "max_pixels": 4096},
            "lora": {"rank": 2, "alpha": 2.0, "preset": "eligen"},
            "train": {"steps": steps, "learning_rate": 1e-2, "batch_size": 2, "seed": 3, "schedule": "cosine",
                      "precision": "fp32",
                      "entity_weight": 0.5, "entity_dropout": 0.3, "caption_dropout": 0.3, "checkpoint_every": 1,
                      **train},
            "encoding": {"cache": "memory", "entity_text_length": "real_length"},
            "output": {"lora_name": "dp"}})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("dp_data"))
    write_dataset(folder, 5, seed=2, split="train", size=32)  # 5 samples: the step after an epoch is short
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset):
    """``reference(family, world, accumulation)``: (run, TrainResult, LoRA path, run folder) of one process
    with the global batch of ``world`` ranks x 1 (toy_run, 2 steps, float64 models), computed once per
    module: the table and the rendezvous test share one."""
    folder, done = tmp_path_factory.mktemp("one_process"), {}

    def compute(family, world, accumulation):
        name = f"{family}_{world}_{accumulation}"
        if name not in done:
            run = toy_run(dataset, family, steps=2, grad_accumulation=accumulation)
            result, path = one_process(run, str(folder / name), torch.float64, batch_size=world)
            done[name] = (run, result, path, str(folder / name))
        return done[name]

    return compute


def losses(run_dir):
    return checkpoints.Checkpoint(checkpoints.latest_checkpoint(run_dir)).info["losses"]


def lora_difference(path, reference_path):
    ours, reference = load_file(path), load_file(reference_path)
    assert ours.keys() == reference.keys()
    return max((ours[k] - reference[k]).abs().max().item() for k in reference)


def checkpoint_difference(run_dir, reference_dir):
    """Max difference of the last checkpoints' LoRA tensors, in the dtype they trained in (float64 here;
    the saved LoRA file is float32)."""
    ours, reference = (checkpoints.Checkpoint(checkpoints.latest_checkpoint(d)).lora for d in (run_dir, reference_dir))
    assert ours.keys() == reference.keys()
    return max((ours[k] - reference[k]).abs().max().item() for k in reference)


def test_ranks_equal_one_process_with_the_same_global_batch(tmp_path, dataset, reference):
    """Batch 1 per rank on 2 and 3 ranks = batch 2 and 3 on one process: both families, gradient
    accumulation 1 and 2, plain data parallel and with the frozen base sharded by FSDP (fully_shard, gloo).
    The toy samples differ in entity count and prompt length, and entity dropout changes them further,
    so one process runs padded batches where the ranks run single samples. One torchrun launch of 3
    processes trains all 16 runs: first as its own world of 3, then ranks 0 and 1 as a world of 2
    (tests/support/torchrun_worker.py); each run builds its own model, LoRA and optimizer.

    Toy models in float64 (and so a float64 LoRA): the comparison is then exact up to float64 rounding,
    so any difference in which samples, randomness or weighting the ranks use would show. In float32 a
    batch of two rounds differently from two batches of one (matrix products over other row counts and
    sequence lengths), and AdamW, dividing by sqrt(v) + 1e-8, turns that rounding in near-zero gradient
    entries into visible weight differences (training/loop.py, GradientSum)."""
    table, blocks, references = [], [], {}
    for world in (3, 2):
        jobs = []
        for family in ("flux", "qwen_image"):
            for accumulation in (1, 2):
                name = f"{family}_{world}_{accumulation}"
                run, *references[name] = reference(family, world, accumulation)
                path = write_run(str(tmp_path / f"{name}.json"), run)
                for fsdp in (False, True):
                    jobs.append({"run": path, "run_dir": str(tmp_path / name / ("fsdp" if fsdp else "ranks")),
                                 "batch_size": 1, "fsdp": fsdp, "dtype": "float64"})
        blocks.append({"world": world, "store": str(tmp_path / f"store_{world}"), "jobs": jobs})
    started = time.monotonic()
    done = subprocess.run(torchrun(3) + [WORKER, "jobs", json.dumps(blocks)],
                          env=environment(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(f"torchrun, 3 processes, {sum(len(b['jobs']) for b in blocks)} runs: {time.monotonic() - started:.1f} s")
    for name, (one, one_path, one_dir) in references.items():
        for mode in ("ranks", "fsdp"):
            run_dir = tmp_path / name / mode
            difference = lora_difference(str(run_dir / "dp.safetensors"), one_path)
            trained = checkpoint_difference(str(run_dir), one_dir)
            curve = losses(str(run_dir))
            loss = max(abs(a - b) for (_, a), (_, b) in zip(curve, one.losses))
            table.append((name, mode, difference, trained, loss))
            assert [s for s, _ in curve] == [1, 2]
            # only rank 0 wrote: one checkpoint series, one LoRA, one loss graph
            assert sorted(os.listdir(run_dir)) == [
                "dp.safetensors", "latest.json", "loss.png", "step_000001.safetensors", "step_000002.safetensors"]
    print("run (family_ranks_accumulation) | mode | LoRA file (float32) | LoRA as trained (float64) | loss"
          " (max abs differences)")
    for row in table:
        print(" | ".join(f"{v:.2e}" if isinstance(v, float) else str(v) for v in row))
    # (observed: 0 for the float32 file, up to 2e-13 as trained, 4e-16 for the loss; a wrong sample,
    # generator or weight changes the loss by far more than the bound)
    assert all(max(differences) <= 1e-6 for _, _, *differences in table), table
    # The shared disk cache holds each latent and prompt once, written by one of the ranks.
    cache = tmp_path / "flux_2_1" / "cache"
    assert len(os.listdir(cache / "latent")) == 5 and len(os.listdir(cache / "text")) > 5


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_joined_by_rendezvous_equal_one_process(tmp_path, reference):
    """The documented multi-node command on loopback: two torchrun launchers ("nodes") of one process
    each, joined by the c10d rendezvous, train the LoRA of one process with batch 2 (scripts/train.py's
    command line on float64 toy models, as in the equality test above)."""
    run, _, one_path, _ = reference("flux", 2, 2)
    path = write_run(str(tmp_path / "run.json"), run)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen(TORCHRUN + ["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                                          "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
                                          "--rdzv_id", "eligen_test", WORKER, "train", "float64", path,
                                          "--run-dir", str(tmp_path / "nodes"), "--cache-dir", str(tmp_path / "cache"),
                                          "--batch-size", "1"],
                              env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=600)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-2000:] for o in outputs)
    assert "step 2/2" in "".join(outputs) and "(2 ranks)" in "".join(outputs)
    difference = lora_difference(str(tmp_path / "nodes" / "dp.safetensors"), one_path)
    print(f"2 nodes x 1 process (c10d rendezvous) vs 1 process: LoRA max abs difference {difference:.2e}")
    assert difference <= 1e-6


def rank_pid(torchrun_pid, rank):
    """PID of the worker with RANK=rank among torchrun's children (Linux /proc)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as handle:
                env = handle.read().split(b"\0")
        except OSError:
            continue
        if parent == torchrun_pid and f"RANK={rank}".encode() in env:
            return int(entry)
    return None


def kill_a_rank(command, path, run_dir, victim, at_line):
    """Train ``path`` on 2 ranks with ``command`` (scripts/train.py or the worker's copy of its command
    line), SIGKILL rank ``victim`` when rank 0 prints a line starting with ``at_line``; returns everything
    the job printed."""
    job = subprocess.Popen(torchrun(2) + command + [path, "--run-dir", run_dir, "--batch-size", "1"],
                           env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    try:
        for line in job.stdout:
            output.append(line)
            if line.startswith(at_line):
                pid = rank_pid(job.pid, victim)
                assert pid is not None, "".join(output)
                os.kill(pid, signal.SIGKILL)
                break
        output.append(job.stdout.read())
        job.wait(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    text = "".join(output)
    assert job.returncode != 0, text[-3000:]
    return text


def the_failure_line(text, victim, run_dir):
    """The job's one 'EliGen training failed' line names the killed rank and the latest checkpoint."""
    failed = [line for line in text.splitlines() if "EliGen training failed" in line]
    assert len(failed) == 1, text[-3000:]
    match = re.fullmatch(rf"EliGen training failed: rank {victim} of 2 died \(.*\); resume with --resume latest "
                         r"from (.*step_\d{6}\.safetensors)", failed[0])
    assert match, failed[0]
    assert match.group(1) == checkpoints.latest_checkpoint(run_dir)
    return failed[0]


def test_a_killed_rank_ends_the_job_and_one_process_resumes(tmp_path, dataset):
    """float64 toy models, so the resumed run can be compared with an uninterrupted one exactly."""
    run = toy_run(dataset, "flux", steps=10, checkpoint_every=2)
    path = write_run(str(tmp_path / "run.json"), run)
    run_dir = str(tmp_path / "killed")
    text = kill_a_rank([WORKER, "train", "float64"], path, run_dir, 1, "step 3/10")
    # torchrun's report names the failed rank and its signal; the survivor's line says what to do
    assert re.search(r"Root Cause.*\n(.*\n){1,4}?\s*rank\s*:\s*1 \(local_rank: 1\)\n.*SIGKILL", text), text[-3000:]
    assert "step 10/10" not in text
    print(the_failure_line(text, 1, run_dir))

    last = checkpoints.Checkpoint(checkpoints.latest_checkpoint(run_dir))  # loadable
    assert 2 <= last.step < 10 and last.lora
    resumed, _ = one_process(run, run_dir, torch.float64, resume="latest", batch_size=2)
    assert resumed.step == 10 and [s for s, _ in resumed.losses] == list(range(1, 11))
    # the same as an uninterrupted run: the randomness does not depend on the number of processes
    whole, _ = one_process(run, str(tmp_path / "whole"), torch.float64, batch_size=2)
    for key, value in whole.lora.items():
        torch.testing.assert_close(resumed.lora[key], value, rtol=0, atol=1e-6)
    print(text[-1500:])

    # Started again in that folder without --resume, every rank refuses before encoding; nothing changes.
    files = {f: os.path.getmtime(os.path.join(run_dir, f)) for f in os.listdir(run_dir)}
    again = subprocess.run(torchrun(2) + [TRAIN, path, "--run-dir", run_dir,
                                       "--batch-size", "1"], env=environment(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode != 0
    for rank in (0, 1):
        assert (f"EliGen training failed: rank {rank} of 2: ValueError: the run folder {run_dir} already holds a "
                f"run (dp.safetensors, latest.json, step_") in again.stderr, again.stderr[-3000:]
    assert {f: os.path.getmtime(os.path.join(run_dir, f)) for f in os.listdir(run_dir)} == files


def test_a_killed_rank_0_is_named_by_rank_1(tmp_path, dataset):
    """scripts/train.py itself; the writing rank dies: the other rank names it and the last checkpoint
    rank 0 wrote."""
    run = toy_run(dataset, "qwen_image", steps=10, checkpoint_every=2)
    path = write_run(str(tmp_path / "run.json"), run)
    run_dir = str(tmp_path / "killed")
    text = kill_a_rank([TRAIN], path, run_dir, 0, "step 4/10")
    print(the_failure_line(text, 0, run_dir))
    assert 2 <= checkpoints.Checkpoint(checkpoints.latest_checkpoint(run_dir)).step <= 4


def test_each_cache_entry_is_encoded_by_exactly_one_rank(tmp_path, dataset):
    """The first pass of encode_shared on ranks 0 and 1 of 2 (run here one after the other: each encodes
    only what it owns) covers every entry once; the second pass then reads everything from disk."""
    from comfyui_eligen.core.conditioning import TEXT_LENGTHS
    from comfyui_eligen.toyworld.models import load_toy_models
    from comfyui_eligen.training.cache import EncodingCache, encode_dataset
    from comfyui_eligen.training.dataset import load_dataset
    from comfyui_eligen.training.distributed import OwnedEntriesCache

    with torch.inference_mode():
        model, clip, vae = load_toy_models("flux", "random", 0)
        data = load_dataset(dataset, 4096)
        options = dict(latent_format=model, entity_tokenizer_options=TEXT_LENGTHS["real_length"])
        folder = str(tmp_path / "cache")
        firsts = [OwnedEntriesCache(folder, rank, 2) for rank in (0, 1)]
        for first in firsts:
            encode_dataset(data, vae, clip, cache=first, **options)
        second = EncodingCache(folder)
        samples = encode_dataset(data, vae, clip, cache=second, **options)
        alone = encode_dataset(data, vae, clip, cache=EncodingCache(None), **options)
    latents = len(os.listdir(os.path.join(folder, "latent")))
    texts = len(os.listdir(os.path.join(folder, "text")))
    assert sum(f.encoder_calls["vae_images"] for f in firsts) == latents == len(data)
    assert sum(f.encoder_calls["text"] for f in firsts) == texts
    assert all(f.encoder_calls["vae_images"] + f.encoder_calls["text"] > 0 for f in firsts)  # both ranks worked
    assert second.encoder_calls == {"vae": 0, "vae_images": 0, "text": 0}
    for shared, own in zip(samples, alone):
        assert torch.equal(shared.latent, own.latent) and torch.equal(shared.context, own.context)
