"""Every path as safe as the node: each case on the node's plain function (run_training) and on the
headless trainer (a run file, training/headless.py; the command line itself where it matters), with the
message that names the item. Refusals come before any encoding: the disk cache folder is never made."""

import json
import logging
import os
import re
import subprocess
import sys

import pytest
from safetensors.torch import save_file

import torch

from comfyui_eligen.core import lora_formats
from comfyui_eligen.nodes.training import node_job, run_training
from comfyui_eligen.toyworld.data import write_dataset
from comfyui_eligen.toyworld.models import load_toy_models
from comfyui_eligen.training import checkpoints, headless
from comfyui_eligen.training.dataset import load_dataset
from comfyui_eligen.training.job import RunFileError, read_job
from comfyui_eligen.training.lora import LoraSettings
from comfyui_eligen.training.run_file import write_run
from comfyui_eligen.training.runner import JobInputs
from comfyui_eligen.training.settings import TrainSettings

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(TESTS)
LORA = dict(rank=2, alpha=2.0)
TRAIN = dict(learning_rate=1e-2, precision="fp32", gradient_checkpointing=False, checkpoint_every=0)
TOY = {"loader": "EliGenToyModelLoader", "inputs": {"family": "flux", "weights": "random", "seed": 0}}
TOY_LOADERS = {"EliGenToyModelLoader": load_toy_models}


@pytest.fixture(scope="module")
def dataset_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("safety_data"))
    write_dataset(folder, 2, seed=0, split="train", size=32)
    return folder


def node(dataset_folder, name, resume="", lora=None, **train):
    """The node's work on the toy FLUX with disk caching (so encoding leaves a trace)."""
    model, clip, vae = load_toy_models("flux", "random", seed=0)
    dataset = load_dataset(dataset_folder, 4096)
    settings = TrainSettings(**{"steps": 1, **TRAIN, **train})
    job = node_job(dataset, lora or LoraSettings(**LORA), settings, name, cache="disk", entity_text_length="real_length")
    return run_training(job, JobInputs(model, clip, vae, dataset), resume=resume)


def run_file(dataset_folder, name, lora=None, **train):
    return {"version": 1, "model": TOY, "clip": TOY, "vae": TOY, "dataset": {"folder": dataset_folder, "max_pixels": 4096},
            "lora": {**LORA, **(lora or {})}, "train": {"steps": 1, **TRAIN, **train},
            "encoding": {"cache": "disk", "entity_text_length": "real_length"}, "output": {"lora_name": name}}


def headless_run(dataset_folder, run_dir, name, resume=None, lora=None, **train):
    job = read_job(run_file(dataset_folder, name, lora, **train), "run file")
    return headless.run(job, headless.Options(run_dir=str(run_dir), resume=resume), loaders=TOY_LOADERS)


def node_cache(output):
    return os.path.join(output, "eligen_training", "cache")


# ---- an earlier run in the run folder -------------------------------------------------------------

def test_node_moves_an_earlier_run_of_the_name_aside(comfy_folders, dataset_folder, caplog):
    output, loras = comfy_folders
    node(dataset_folder, "again", steps=2)
    first = (loras / "again.safetensors").read_bytes()
    caplog.set_level(logging.WARNING)
    node(dataset_folder, "again", steps=1)
    runs = output / "eligen_training"
    assert "was used by an earlier run; that run is kept in " + str(runs / "again.run1") in caplog.text
    assert (runs / "again.run1" / "lora.safetensors").read_bytes() == first
    assert checkpoints.checkpoint_steps(str(runs / "again.run1")) == [2]
    assert checkpoints.checkpoint_steps(str(runs / "again")) == [1]  # the two runs never mix


def test_headless_refuses_a_run_folder_that_holds_a_run(tmp_path, dataset_folder):
    run_dir = tmp_path / "run"
    headless_run(dataset_folder, run_dir, "again", steps=2)
    before = {f: (run_dir / f).read_bytes() for f in os.listdir(run_dir)}
    with pytest.raises(ValueError) as error:
        headless_run(dataset_folder, run_dir, "again", steps=1)
    assert str(error.value) == (
        f"the run folder {run_dir} already holds a run (again.safetensors, latest.json, step_000002.safetensors); "
        f"nothing was overwritten. To continue that run, resume 'latest' (--resume latest); to start a new one, "
        f"choose another run folder (--run-dir)")
    assert {f: (run_dir / f).read_bytes() for f in os.listdir(run_dir)} == before


# ---- folders that cannot hold the outputs, names that cannot be files -------------------------------

def test_node_refuses_unusable_folders_and_names_before_encoding(comfy_folders, dataset_folder):
    output, loras = comfy_folders
    (output / "eligen_training").write_text("a file where the run folders go")
    with pytest.raises(ValueError, match=r"the training output folder .*eligen_training is a file, not a folder"):
        node(dataset_folder, "fine")
    (output / "eligen_training").unlink()
    for name, message in [("n" * 300, "lora_name is 300 characters long"),
                          ("bad\0name", r"lora_name 'bad\\x00name' must be a plain file name \(it holds a NUL"),
                          ("../../evil", r"lora_name '../../evil' must be a plain file name \(no folders: it "
                                         r"contains a path separator\)")]:
        with pytest.raises(ValueError, match=message):
            node(dataset_folder, name)
    assert not os.path.exists(node_cache(output)) and os.listdir(loras) == []


def test_headless_refuses_unusable_folders_and_names_before_encoding(tmp_path, dataset_folder):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=rf"the run folder {blocker} is a file, not a folder"):
        headless_run(dataset_folder, blocker, "fine")
    with pytest.raises(ValueError, match=rf"the run folder {blocker / 'run'} cannot be written \(Not a directory\)"):
        headless_run(dataset_folder, blocker / "run", "fine")
    with pytest.raises(ValueError, match="lora_name is 300 characters long"):
        headless_run(dataset_folder, tmp_path / "long", "n" * 300)
    for name, message in [("bad\0name", "field 'output.lora_name': lora_name 'bad\\x00name' must be a plain file name "
                                        "(it holds a NUL"),
                          ("../../evil", "field 'output.lora_name': lora_name '../../evil' must be a plain file name "
                                         "(no folders: it contains a path separator)")]:
        with pytest.raises(RunFileError) as error:
            headless_run(dataset_folder, tmp_path / "bad", name)
        assert message in str(error.value)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "long").exists()


# ---- a LoRA the package did not write ------------------------------------------------------------

def foreign_lora(path):
    save_file({"lora_unet_x.lora_up.weight": torch.ones(2, 2)}, str(path))  # e.g. downloaded: no EliGen metadata
    return path.read_bytes()


def test_node_never_replaces_a_lora_it_did_not_write(comfy_folders, dataset_folder):
    output, loras = comfy_folders
    downloaded = foreign_lora(loras / "downloaded.safetensors")
    with pytest.raises(ValueError) as error:
        node(dataset_folder, "downloaded")
    assert str(error.value) == (
        f"lora_name 'downloaded': {loras / 'downloaded.safetensors'} already exists and was not written by EliGen "
        f"training (no 'eligen_training' metadata), so it is not replaced; choose another lora_name or move that "
        f"file away")
    assert (loras / "downloaded.safetensors").read_bytes() == downloaded and not os.path.exists(node_cache(output))
    # a LoRA of an earlier EliGen run is ours to replace (its run folder is moved aside with a link to it)
    node(dataset_folder, "ours")
    node(dataset_folder, "ours")
    assert "eligen_training" in lora_formats.load_lora_metadata(str(loras / "ours.safetensors"))


def test_headless_never_replaces_a_lora_it_did_not_write(tmp_path, dataset_folder):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    downloaded = foreign_lora(run_dir / "downloaded.safetensors")
    with pytest.raises(ValueError, match=rf"{run_dir / 'downloaded.safetensors'} already exists and was not "
                                         rf"written by EliGen training"):
        headless_run(dataset_folder, run_dir, "downloaded")
    assert (run_dir / "downloaded.safetensors").read_bytes() == downloaded and not (tmp_path / "cache").exists()


# ---- values a run file (or a plain call) may hold ----------------------------------------------------

VALUES = [
    (dict(steps="10"), {}, "steps must be an integer (got \"10\")"),
    (dict(steps=2.5), {}, "steps must be an integer (got 2.5)"),
    (dict(steps=float("inf")), {}, "steps must be an integer (got inf)"),
    (dict(batch_size=2.0), {}, "batch_size must be an integer (got 2.0)"),
    (dict(seed=2**70), {}, "seed must be at most 2147483647 (got 1180591620717411303424)"),
    ({}, dict(rank=4.5), "rank must be an integer (got 4.5)"),
]


@pytest.mark.parametrize("train, lora, message", VALUES, ids=[v[2].split(" (")[0] for v in VALUES])
def test_bad_values_are_named_on_both_paths(comfy_folders, dataset_folder, tmp_path, train, lora, message):
    output, _ = comfy_folders
    part = "lora" if lora else "train"
    with pytest.raises(ValueError, match=rf"training job: {part}: " + message.replace("(", r"\(").replace(")", r"\)")):
        node(dataset_folder, "values", lora=LoraSettings(**{**LORA, **lora}), **train)
    field = next(iter(train or lora))
    with pytest.raises(RunFileError) as error:
        headless_run(dataset_folder, tmp_path / "run", "values", lora=lora, **train)
    assert str(error.value) == f"run file: field '{part}.{field}': {message}"
    assert not os.path.exists(node_cache(output)) and not (tmp_path / "cache").exists()


# ---- resume ------------------------------------------------------------------------------------------

def test_resume_with_no_step_left_says_so_on_both_paths(comfy_folders, dataset_folder, tmp_path):
    output, _ = comfy_folders
    node(dataset_folder, "done", steps=2)
    with pytest.raises(ValueError, match=r"resume: checkpoint .*done/step_000002.safetensors is at step 2 and steps "
                                         r"is 2, so there is nothing left to train; set steps above 2"):
        node(dataset_folder, "done", resume="latest", steps=2)
    headless_run(dataset_folder, tmp_path / "run", "done", steps=2)
    with pytest.raises(ValueError, match=r"is at step 2 and steps is 1, so there is nothing left to train"):
        headless_run(dataset_folder, tmp_path / "run", "done", resume="latest", steps=1)


def test_resuming_a_run_moved_aside_names_where_it_went(comfy_folders, dataset_folder):
    output, _ = comfy_folders
    runs = output / "eligen_training"
    node(dataset_folder, "moved", steps=2)
    node(dataset_folder, "moved", steps=1)  # a new run of the name: the first moves to moved.run1
    hint = (f"; a later run of this name moved earlier runs aside: {runs / 'moved.run1'} (steps 2). To continue one, "
            f"train in its folder: lora_name 'moved.run1' on the node, --run-dir {runs / 'moved.run1'} on the "
            f"command line")
    with pytest.raises(ValueError) as error:
        node(dataset_folder, "moved", resume="step_000002.safetensors", steps=3)
    assert str(error.value) == f"resume: checkpoint step_000002.safetensors does not exist in {runs / 'moved'}" + hint
    # the command line pointed at the node's folder says the same
    with pytest.raises(ValueError) as error:
        headless_run(dataset_folder, runs / "moved", "moved", resume="step_000002.safetensors", steps=3)
    assert str(error.value).endswith(hint)
    # and the hint works: the moved run continues under its folder's name
    resumed = node(dataset_folder, "moved.run1", resume="latest", steps=3)["result"]
    assert [step for step, _ in resumed.losses] == [1, 2, 3]


# ---- what block swap chose --------------------------------------------------------------------------

def test_node_logs_what_block_swap_chose(comfy_folders, dataset_folder, caplog):
    caplog.set_level(logging.INFO)
    node(dataset_folder, "swap", blocks_to_swap=1)
    assert re.search(r"EliGen training: max_vram_gb .*; block swap: 1 of 4 blocks kept in CPU memory", caplog.text)


def test_the_command_line_shows_block_swap_and_refuses_a_second_run(tmp_path, dataset_folder):
    """scripts/train.py itself: its INFO lines show block swap; run again in the same folder it stops
    with the message (one line, exit status 1) and changes nothing."""
    from conftest import comfyui_dir

    path = write_run(str(tmp_path / "run.json"), read_job(run_file(dataset_folder, "cli", blocks_to_swap=1)))
    command = [sys.executable, os.path.join(REPO, "scripts", "train.py"), path, "--run-dir", str(tmp_path / "run")]
    env = {**os.environ, "COMFYUI_DIR": comfyui_dir(), "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert re.search(r"INFO EliGen training: max_vram_gb .*; block swap: 1 of 4 blocks kept in CPU memory",
                     first.stderr), first.stderr[-3000:]
    assert "step 1/1 loss" in first.stdout and "Requested to load" not in first.stderr  # ComfyUI's INFO stays out
    files = sorted(os.listdir(tmp_path / "run"))
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]  # one line, no traceback
    assert (f"EliGen training failed: ValueError: the run folder {tmp_path / 'run'} already holds a run "
            f"(cli.safetensors, latest.json, step_000001.safetensors); nothing was overwritten") in second.stderr
    assert sorted(os.listdir(tmp_path / "run")) == files and json.loads((tmp_path / "run" / "latest.json").read_text())
