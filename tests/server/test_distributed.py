"""Data parallel training under real torchrun (gloo, 2 CPU processes): the same LoRA and loss curve as
one process with the whole batch; the shared encoding cache computed once; a killed rank ends the job
with a message naming it, one process resumes from the last checkpoint, and a new job in that folder
without --resume is refused by every rank."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from comfyui_eligen.toyworld.data import write_dataset
from comfyui_eligen.toyworld.models import load_toy_models
from comfyui_eligen.training import checkpoints, headless
from comfyui_eligen.training.job import read_job
from comfyui_eligen.training.run_file import write_run

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(TESTS)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def environment():
    from conftest import comfyui_dir

    return {**os.environ, "OMP_NUM_THREADS": "1", "COMFYUI_DIR": comfyui_dir(), "PYTHONUNBUFFERED": "1"}


TOY_LOADERS = {"EliGenToyModelLoader": load_toy_models}


def one_process(job, run_dir, **options):
    """The headless trainer in this process: (TrainResult, LoRA path)."""
    done = headless.run(job, headless.Options(run_dir=run_dir, **options), loaders=TOY_LOADERS)
    return done.result, done.lora_path


def toy_run(dataset, family, steps=3, **train):
    toy = {"loader": "EliGenToyModelLoader", "inputs": {"family": family, "weights": "random", "seed": 0}}
    return read_job({"version": 1, "model": toy, "clip": toy, "vae": toy,
            "dataset": {"folder": dataset, "max_pixels": 4096},
            "lora": {"rank": 2, "alpha": 2.0, "preset": "eligen"},
            "train": {"steps": steps, "learning_rate": 1e-2, "batch_size": 2, "seed": 3, "schedule": "cosine",
                      "entity_weight": 0.5, "entity_dropout": 0.3, "caption_dropout": 0.3, "checkpoint_every": 1,
                      **train},
            "encoding": {"cache": "memory", "entity_text_length": "real_length"},
            "output": {"lora_name": "dp"}})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("dp_data"))
    write_dataset(folder, 5, seed=2, split="train", size=32)  # 5 samples: the step after an epoch is short
    return folder


def losses(run_dir):
    return checkpoints.Checkpoint(checkpoints.latest_checkpoint(run_dir)).info["losses"]


def test_two_processes_equal_one_with_the_whole_batch(tmp_path, dataset):
    """Per-rank batch 1 on 2 ranks = batch 2 on one process; plain data parallel and with the frozen base
    sharded by FSDP (fully_shard, gloo on CPU)."""
    jobs, references = [], {}
    for family in ("flux", "qwen_image"):
        run = toy_run(dataset, family, steps=2, grad_accumulation=2)  # global batch 1 x 2 ranks x 2
        path = write_run(str(tmp_path / f"{family}.json"), run)
        references[family] = one_process(run, str(tmp_path / family / "one"))
        for mode in ("two", "fsdp"):
            jobs.append({"run": path, "run_dir": str(tmp_path / family / mode), "batch_size": 1, "fsdp": mode == "fsdp"})
    started = time.monotonic()
    done = subprocess.run(TORCHRUN + [os.path.join(TESTS, "support", "torchrun_worker.py"), json.dumps(jobs)],
                          env=environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(f"torchrun, 2 processes, both families, with and without FSDP: {time.monotonic() - started:.1f} s")
    for family, mode in [(f, m) for f in references for m in ("two", "fsdp")]:
        one, one_path = references[family]
        two = load_file(os.path.join(tmp_path, family, mode, "dp.safetensors"))
        reference = load_file(one_path)
        assert two.keys() == reference.keys()
        difference = max((two[k] - reference[k]).abs().max().item() for k in reference)
        assert difference <= 1e-6, (family, mode, difference)
        curve = losses(str(tmp_path / family / mode))
        assert [s for s, _ in curve] == [1, 2]
        assert [l for _, l in curve] == pytest.approx([l for _, l in one.losses], rel=1e-6, abs=1e-9)
        # only rank 0 wrote: one checkpoint series, one LoRA, one loss graph
        assert sorted(os.listdir(tmp_path / family / mode)) == [
            "dp.safetensors", "latest.json", "loss.png", "step_000001.safetensors", "step_000002.safetensors"]
    # The shared disk cache holds each latent and prompt once, written by one of the ranks.
    cache = tmp_path / "flux" / "cache"
    assert len(os.listdir(cache / "latent")) == 5 and len(os.listdir(cache / "text")) > 5


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


def test_a_killed_rank_ends_the_job_and_one_process_resumes(tmp_path, dataset):
    run = toy_run(dataset, "flux", steps=10, checkpoint_every=2)
    path = write_run(str(tmp_path / "run.json"), run)
    run_dir = str(tmp_path / "killed")
    job = subprocess.Popen(TORCHRUN + [os.path.join(REPO, "scripts", "train.py"), path, "--run-dir", run_dir,
                                       "--batch-size", "1"],
                           env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    try:
        for line in job.stdout:
            output.append(line)
            if line.startswith("step 3/10"):
                victim = rank_pid(job.pid, 1)
                assert victim is not None, "".join(output)
                os.kill(victim, signal.SIGKILL)
                break
        output.append(job.stdout.read())
        job.wait(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    text = "".join(output)
    assert job.returncode != 0, text[-3000:]
    # torchrun's report names the failed rank and its error
    assert re.search(r"Root Cause.*\n(.*\n){1,4}?\s*rank\s*:\s*1 \(local_rank: 1\)\n.*SIGKILL", text), text[-3000:]
    assert "step 10/10" not in text

    last = checkpoints.Checkpoint(checkpoints.latest_checkpoint(run_dir))  # loadable
    assert 2 <= last.step < 10 and last.lora
    resumed, _ = one_process(run, run_dir, resume="latest", batch_size=2)
    assert resumed.step == 10 and [s for s, _ in resumed.losses] == list(range(1, 11))
    # the same as an uninterrupted run: the randomness does not depend on the number of processes
    whole, _ = one_process(run, str(tmp_path / "whole"), batch_size=2)
    for key, value in whole.lora.items():
        torch.testing.assert_close(resumed.lora[key], value, rtol=0, atol=1e-6)
    print(text[-1500:])

    # Started again in that folder without --resume, every rank refuses before encoding; nothing changes.
    files = {f: os.path.getmtime(os.path.join(run_dir, f)) for f in os.listdir(run_dir)}
    again = subprocess.run(TORCHRUN + [os.path.join(REPO, "scripts", "train.py"), path, "--run-dir", run_dir,
                                       "--batch-size", "1"], env=environment(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode != 0
    for rank in (0, 1):
        assert (f"EliGen training failed: rank {rank} of 2: ValueError: the run folder {run_dir} already holds a "
                f"run (dp.safetensors, latest.json, step_") in again.stderr, again.stderr[-3000:]
    assert {f: os.path.getmtime(os.path.join(run_dir, f)) for f in os.listdir(run_dir)} == files


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
