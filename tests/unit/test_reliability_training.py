"""Training faults: non-finite steps, two runs of one name, the output checked before the first step,
temp files, disk full, damaged checkpoints and cache entries, resume with other LoRA settings."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import save_file

import folder_paths
from comfyui_eligen.core import files, lora_formats
from comfyui_eligen.training import cache, checkpoints, outputs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_checkpoint(path, meta):
    save_file({"lora.x.lora_A": torch.zeros(2, 2)}, str(path),
              metadata={checkpoints.METADATA_KEY: meta if isinstance(meta, str) else json.dumps(meta)})
    return str(path)


GOOD_META = {"step": 3, "info": {"family": "flux"}, "optimizer": {"param_groups": [], "scalars": {}}, "scheduler": None}


# ---- two runs with one name -------------------------------------------------------------------

def start_run(name, loras, output, resume="", steps=1000):
    """The node's output checks for ``name`` (as run_training makes them); returns the run folder."""
    folders = outputs.node_folders(name, str(loras), str(output))
    outputs.prepare_outputs(name, folders, resume, steps)
    return folders.run


def our_lora(path, text="first run's lora"):
    """A LoRA file as training writes it (its metadata says so)."""
    lora_formats.save_lora(str(path), {"x.lora_up.weight": torch.zeros(1)}, {"eligen_training": {"note": text}})
    return path.read_bytes()


def test_a_new_run_of_a_used_name_keeps_the_earlier_run_whole(tmp_path):
    loras, output = tmp_path / "loras", tmp_path / "output"
    runs = output / outputs.RUNS_FOLDER
    run = runs / "mine"
    run.mkdir(parents=True)
    loras.mkdir()
    for step in (90, 100):
        write_checkpoint(run / f"step_{step:06d}.safetensors", dict(GOOD_META, step=step))
    first_lora = our_lora(loras / "mine.safetensors")

    # resume continues the same folder
    assert start_run("mine", loras, output, resume="step_000100.safetensors") == str(run)
    assert sorted(os.listdir(run)) == ["step_000090.safetensors", "step_000100.safetensors"]

    # a new run: the earlier one moves to mine.run1 with its LoRA; the new one starts empty
    assert start_run("mine.safetensors", loras, output, resume="") == str(run)
    assert not run.exists()
    kept = runs / "mine.run1"
    assert sorted(os.listdir(kept)) == ["lora.safetensors", "step_000090.safetensors", "step_000100.safetensors"]
    assert (kept / "lora.safetensors").read_bytes() == first_lora
    # the new run's (lower-numbered) checkpoints can never be pruned in favour of the old ones
    run.mkdir()
    for step in (1, 2, 3, 4):
        write_checkpoint(run / f"step_{step:06d}.safetensors", dict(GOOD_META, step=step))
    checkpoints._prune(str(run), keep_last=2, keep="step_000004.safetensors")
    assert sorted(os.listdir(run)) == ["step_000003.safetensors", "step_000004.safetensors"]
    start_run("mine", loras, output, resume="")
    assert sorted(os.listdir(runs)) == ["mine.run1", "mine.run2"]


def test_pruning_orders_by_step_number(tmp_path):
    for step in (9, 10, 1_000_000):
        write_checkpoint(tmp_path / f"step_{step:06d}.safetensors", dict(GOOD_META, step=step))
    checkpoints._prune(str(tmp_path), keep_last=2, keep="step_1000000.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["step_000010.safetensors", "step_1000000.safetensors"]


# ---- the output, checked before anything runs ---------------------------------------------------

@pytest.mark.parametrize("name, reason", [
    ("x" * 250, "characters long"), ("x" * 300, "characters long"), ("bad\0name", "control character"),
    ("tab\tname", "control character"), ("CON", "reserved device name"), ("lpt1.v2", "reserved device name"),
    ("trailing.", "ends with a dot"), ("trailing ", None), ("a/b", "no folders"), ("..", "not empty"),
    ("", "not empty"), (".hidden", "starting with a dot"), ("a|b", "special characters"),
])
def test_bad_lora_names_are_refused_before_training(tmp_path, name, reason):
    if reason is None:  # surrounding spaces are trimmed: "trailing" is fine
        assert outputs.plain_lora_name(name) == "trailing"
        return
    with pytest.raises(ValueError, match="lora_name") as error:
        start_run(name, tmp_path / "loras", tmp_path / "output")
    assert reason in str(error.value)


def test_long_paths_and_unwritable_folders_are_refused(tmp_path):
    deep = tmp_path / ("d" * 200) / ("e" * 200)
    for _ in range(18):
        deep = deep / ("f" * 200)
    with pytest.raises(ValueError, match="full paths of the run's files would be .* bytes, over the limit"):
        start_run("ok", deep, tmp_path / "output")
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the LoRA folder should be")
    with pytest.raises(ValueError, match=r"the LoRA folder .*not_a_folder is a file, not a folder"):
        start_run("ok", blocker, tmp_path / "output")
    with pytest.raises(ValueError, match=r"the LoRA folder .*not_a_folder/loras cannot be written \(Not a directory"):
        start_run("ok", blocker / "loras", tmp_path / "output")
    assert start_run("x" * 233, tmp_path / "loras", tmp_path / "output").endswith("x" * 233)


# ---- temp files --------------------------------------------------------------------------------

def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_temp_files_are_never_listed_and_stale_ones_are_removed(tmp_path):
    listed = tuple(folder_paths.supported_pt_extensions) + (".json",)
    with files.atomic_path(str(tmp_path / "lora.safetensors")) as temp:
        assert not temp.endswith(listed) and os.path.basename(os.path.dirname(temp)).startswith(".eligen-tmp.")
        with open(temp, "wb") as handle:
            handle.write(b"x")
    assert os.listdir(tmp_path) == ["lora.safetensors"]  # the temp folder went with the write
    host = files._HOST
    stale = tmp_path / "fresh" / f".eligen-tmp.{host}.{dead_pid()}.abcdef.part"
    mine = tmp_path / "fresh" / f".eligen-tmp.{host}.{os.getpid()}.{files._PROCESS}-abcdef.part"
    old_mine = tmp_path / "fresh" / f".eligen-tmp.{host}.{os.getpid()}.abcdef.part"  # no process token: kept
    # the same pid as this process but another process token: a process before this one had the pid
    earlier = tmp_path / "fresh" / f".eligen-tmp.{host}.{os.getpid()}.0badf00d-abcdef.part"
    other_host = tmp_path / "fresh" / f".eligen-tmp.00000000.{dead_pid()}.abcdef.part"
    stale.parent.mkdir()
    for path in (stale, mine, old_mine, earlier, other_host):
        path.write_bytes(b"half a file")
    legacy = tmp_path / "fresh" / ".tmp-ab12cd34.safetensors"
    legacy.write_bytes(b"old")
    os.utime(legacy, (0, 0))
    lora_formats.save_lora(str(tmp_path / "fresh" / "new.safetensors"), {"a.lora_up.weight": torch.zeros(1)})
    assert sorted(os.listdir(tmp_path / "fresh")) == sorted(["new.safetensors", mine.name, old_mine.name, other_host.name])


KILLED_WRITERS = {
    # a checkpoint of ~200 MB written after a small one; a second process then writes step 3
    "checkpoint": ("""
        import torch
        from comfyui_eligen.training import checkpoints
        def save(step, numel):
            weight = torch.nn.Parameter(torch.zeros(4))
            checkpoints.save_checkpoint(FOLDER, step, {"m.lora_A": torch.ones(numel)},
                                        torch.optim.SGD([weight], lr=0.1), None, {"run": "killed"})
        """, ["latest.json", "step_000001.safetensors", "step_000003.safetensors"]),
    # the disk encoding cache: entry k1, then a ~200 MB k2 that is cut off; a second process writes k3
    "cache": ("""
        import os, torch
        from comfyui_eligen.training.cache import EncodingCache
        def save(step, numel):
            EncodingCache(os.path.dirname(FOLDER)).put("latent", f"k{step}", {"latent": torch.ones(numel)})
        """, ["k1.safetensors", "k3.safetensors"]),
}


def run_writer(source, folder, steps_and_sizes):
    lines = [f"import sys; sys.path.insert(0, {os.path.join(REPO, 'tests')!r}); import conftest",
             f"FOLDER = {str(folder)!r}", textwrap.dedent(source)]
    lines += [f"save({step}, {numel}); print('wrote {step}', flush=True)" for step, numel in steps_and_sizes]
    return subprocess.Popen([sys.executable, "-c", "\n".join(lines)], stdout=subprocess.PIPE, text=True)


def safetensors_temps(folder):
    """safetensors' own temp files (``.tmpXXXXXX``) anywhere under ``folder``."""
    return [name for _, _, names in os.walk(folder) for name in names if name.startswith(".tmp")]


@pytest.mark.parametrize("writer", sorted(KILLED_WRITERS))
def test_a_write_killed_mid_way_leaves_only_a_temp_that_the_next_write_removes(tmp_path, writer):
    """SIGKILL while safetensors writes: its own temp file lands in the write's temp folder, which no file
    list shows and a later process's first write in that folder removes (the earlier file stays whole)."""
    source, expected = KILLED_WRITERS[writer]
    folder = tmp_path / "run" if writer == "checkpoint" else tmp_path / "cache" / "latent"
    for attempt in range(3):
        process = run_writer(source, folder, [(1, 16), (2, 50_000_000)])
        assert process.stdout.readline().strip() == "wrote 1"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if safetensors_temps(folder):
                process.send_signal(signal.SIGKILL)  # mid-write: safetensors' temp exists
                break
            time.sleep(0.001)
        process.wait()
        if process.returncode == -signal.SIGKILL:
            break
        shutil.rmtree(tmp_path / ("run" if writer == "checkpoint" else "cache"))  # finished first: again
    assert process.returncode == -signal.SIGKILL, "the kill never landed during the write"
    left = [name for name in os.listdir(folder) if name not in expected]
    assert left and all(name.startswith(files.TEMP_PREFIX) and name.endswith(".part") for name in left), left
    listed, _ = folder_paths.recursive_search(str(folder))
    shown = folder_paths.filter_files_extensions(listed, folder_paths.supported_pt_extensions | {".json", ".png"})
    assert all(not name.startswith(files.TEMP_PREFIX) for name in shown), shown
    assert run_writer(source, folder, [(3, 16)]).wait() == 0
    assert sorted(os.listdir(folder)) == expected


def our_header(path, metadata):
    save_file({"x": torch.zeros(2)}, str(path), metadata=metadata)
    os.utime(path, (0, 0))
    return path


def test_earlier_versions_safetensors_temps_are_removed_only_when_they_are_ours(tmp_path):
    """Before temp folders, safetensors' ``.tmpXXXXXX`` sat beside the target: removed when its header
    holds this package's metadata and it is over an hour old; a user's files of that shape stay."""
    ours = [our_header(tmp_path / ".tmpAb12Cd", {"eligen_checkpoint": "{}"}),
            our_header(tmp_path / ".tmp9zYx8W", {"eligen_cache_version": "1", "kind": "latent"})]
    kept = [our_header(tmp_path / ".tmpUser01", {"format": "pt"}),  # someone else's safetensors
            our_header(tmp_path / ".tmpNoMeta", None)]
    young = tmp_path / ".tmpYoung1"
    save_file({"x": torch.zeros(2)}, str(young), metadata={"eligen_training": "{}"})
    (tmp_path / ".tmpNotST1").write_bytes(b"\x10" + b"\0" * 7 + b"not json at all!")
    os.utime(tmp_path / ".tmpNotST1", (0, 0))
    os.mkfifo(tmp_path / ".tmpFifo01")  # never opened (it would block)
    os.symlink(ours[0], tmp_path / ".tmpLink01")
    kept += [young, tmp_path / ".tmpNotST1", tmp_path / ".tmpFifo01", tmp_path / ".tmpLink01"]
    removed = files.remove_stale_temp_files(str(tmp_path))
    assert sorted(removed) == sorted(map(str, ours))
    assert sorted(os.listdir(tmp_path)) == sorted(path.name for path in kept) and not os.path.exists(ours[0])


def test_disk_full_names_the_file_and_the_folder(tmp_path):
    """A file-size limit (RLIMIT_FSIZE) fails the write like a full disk does ("File too large")."""
    target = tmp_path / "big.safetensors"
    target.write_bytes(b"previous")
    script = textwrap.dedent(f"""
        import importlib.util, resource, signal, sys, torch
        sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
        import conftest
        from comfyui_eligen.core import lora_formats
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            lora_formats.save_lora({str(target)!r}, {{"a.lora_up.weight": torch.zeros(1_000_000)}})
        except OSError as error:
            print(type(error).__name__, error)
    """)
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert "DiskFullError" in out.stdout, out.stdout + out.stderr
    assert str(target) in out.stdout and "disk is full or a file-size limit was reached in " + str(tmp_path) in out.stdout
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["big.safetensors"]


# ---- damaged checkpoints and cache entries -----------------------------------------------------

@pytest.mark.parametrize("meta, message", [
    ("{not json", "metadata is not valid JSON"),
    (json.dumps({"info": {}, "optimizer": {}, "scheduler": None}), "lacks 'step'"),
    (json.dumps([1, 2]), "lacks 'step', 'info', 'optimizer', 'scheduler'"),
    (json.dumps(dict(GOOD_META, step="three")), "bad 'step' or 'info'"),
    (json.dumps(dict(GOOD_META, optimizer={"param_groups": []})), "optimizer metadata lacks"),
])
def test_damaged_checkpoint_metadata_is_named(tmp_path, meta, message):
    path = write_checkpoint(tmp_path / "step_000003.safetensors", meta)
    with pytest.raises(ValueError, match=message) as error:
        checkpoints.Checkpoint(path)
    assert path in str(error.value)


def test_damaged_pointer_and_non_finite_checkpoint_are_named(tmp_path):
    (tmp_path / checkpoints.POINTER).write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"latest.json is damaged \(TypeError"):
        checkpoints.latest_checkpoint(str(tmp_path))
    path = str(tmp_path / "step_000001.safetensors")
    save_file({"lora.x.lora_A": torch.tensor([float("nan")])}, path,
              metadata={checkpoints.METADATA_KEY: json.dumps(GOOD_META)})
    with pytest.raises(ValueError, match=r"tensor 'lora.x.lora_A' holds NaN or inf"):
        checkpoints.Checkpoint(path)


def test_cache_entry_without_its_tensor_is_a_named_miss(tmp_path, caplog):
    store = cache.EncodingCache(str(tmp_path))
    os.makedirs(tmp_path / "latent")
    save_file({"other": torch.zeros(1)}, str(tmp_path / "latent" / "k1.safetensors"))
    save_file({"latent": torch.tensor([float("inf")])}, str(tmp_path / "latent" / "k2.safetensors"))
    assert store.get("latent", "k1") is None and store.get("latent", "k2") is None
    assert "k1.safetensors (no 'latent' tensor)" in caplog.text
    assert "k2.safetensors (tensor 'latent' holds NaN or inf values)" in caplog.text
