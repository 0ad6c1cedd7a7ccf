"""Where a training run writes, all of it checked before the first step (``prepare_outputs``).

A run named ``<name>`` writes, into ``OutputFolders``:
- ``loras/<name>.safetensors`` (and ``<name>_reference.safetensors``): the trained LoRA;
- ``run/``: checkpoints, ``latest.json``, ``loss.png``, validation images.
The node uses ``models/loras`` and ``output/eligen_training/<name>/`` (``node_folders``); the command
line one folder of the user's for both (``folder_outputs``).

**An earlier run in the run folder.** ``resume`` set continues it (its checkpoint must be before
``steps``). Without ``resume`` the node moves the earlier run aside: the folder becomes
``<name>.run<N>`` (the lowest free N) with a hard link (or copy) of the LoRA it produced, and the new run
starts in an empty ``<name>/``; so checkpoints of two runs never share a folder, ``resume: latest``
always means the newest run, and nothing a previous run wrote is deleted. The command line refuses
instead: its run folder is one the user named (often the one holding the run file), and renaming it
under them would be a surprise; the message says how to resume or where else to go.

**A LoRA file the package did not write** (no ``eligen_training`` metadata) at a path the run would
write is never replaced: the run is refused, naming the file.

Also checked: the name (empty, NUL and control characters, path separators, names reserved on
Windows, a trailing dot or space), the length of every file name the run writes and of the full paths,
and that the folders are folders and can be written.
"""

import logging
import os
import re
import shutil
from dataclasses import dataclass

from safetensors import safe_open

from ..core.files import remove_stale_temp_files, temp_path_in
from .checkpoints import FILE_PATTERN, checkpoint_step, checkpoint_steps, latest_checkpoint, resolve_checkpoint

SUFFIXES = (".safetensors", "_reference.safetensors")  # the LoRA files a run writes in its LoRA folder
RUNS_FOLDER = "eligen_training"  # in ComfyUI's output folder: the node's run folders and its cache
CACHE_FOLDER = "cache"           # beside the run folders
MOVED_LORA = "lora.safetensors"  # the LoRA of a run moved aside, inside its folder
FORBIDDEN = '/\\:*?"<>|'
WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
DEFAULT_NAME_MAX = 255
DEFAULT_PATH_MAX = 4096
MOVE_ASIDE, REFUSE = "move_aside", "refuse"
RUN_FILES = re.compile(r"step_\d+\.(safetensors|nonfinite)|latest\.json")  # what makes a folder hold a run


@dataclass
class OutputFolders:
    loras: str        # where <name>.safetensors and <name>_reference.safetensors go
    run: str          # checkpoints, latest.json, loss.png, validation images
    cache: str        # the disk encoding cache
    earlier_run: str  # a new run meeting an earlier run in ``run``: MOVE_ASIDE (the node) or REFUSE


def node_folders(lora_name, loras_dir, output_dir):
    """The node's folders for ``lora_name`` (checked: its run folder is named after it)."""
    name = plain_lora_name(lora_name)
    runs = os.path.join(output_dir, RUNS_FOLDER)
    return OutputFolders(loras_dir, os.path.join(runs, name), os.path.join(runs, CACHE_FOLDER), MOVE_ASIDE)


def folder_outputs(run_dir, cache_dir=None):
    run_dir = os.path.abspath(run_dir)
    cache = cache_dir or os.path.join(os.path.dirname(run_dir), CACHE_FOLDER)
    return OutputFolders(run_dir, run_dir, cache, REFUSE)


def _limit(folder, name, default):
    try:
        return os.pathconf(folder, name)
    except (OSError, ValueError, AttributeError):
        return default


def plain_lora_name(name):
    """A bare LoRA name (".safetensors" dropped) or a ValueError saying what is wrong with it."""
    if not isinstance(name, str):
        raise ValueError(f"lora_name must be text, got {type(name).__name__}")
    name = name.strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    shown = repr(name if len(name) <= 80 else name[:77] + "...")
    if not name or name in (".", ".."):
        raise ValueError(f"lora_name {shown} must be a plain file name (not empty, not . or ..)")
    if any(c in "/\\" for c in name):
        raise ValueError(f"lora_name {shown} must be a plain file name (no folders: it contains a path separator)")
    bad = sorted({c for c in name if c in FORBIDDEN})
    if bad:
        raise ValueError(f"lora_name {shown} must be a plain file name (no special characters: {' '.join(bad)})")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError(f"lora_name {shown} must be a plain file name (it holds a NUL or another control character)")
    if name.startswith("."):
        raise ValueError(f"lora_name {shown} must be a plain file name (not starting with a dot: a hidden file)")
    if name.split(".")[0].lower() in WINDOWS_RESERVED:
        raise ValueError(f"lora_name {shown} must be a plain file name ({name.split('.')[0]!r} is a reserved "
                         f"device name on Windows)")
    if name.endswith((".", " ")):
        raise ValueError(f"lora_name {shown} must be a plain file name (it ends with a dot or a space)")
    return name


def check_output_paths(name, folders):
    """Lengths of every file and path the run writes, and that the folders can be written."""
    existing = [d for d in (folders.loras, os.path.dirname(folders.run)) if os.path.isdir(d)]
    name_max = min((_limit(d, "PC_NAME_MAX", DEFAULT_NAME_MAX) for d in existing), default=DEFAULT_NAME_MAX)
    longest_file = max(len((name + suffix).encode()) for suffix in SUFFIXES)
    run_name = os.path.basename(folders.run) + (".run9999" if folders.earlier_run == MOVE_ASIDE else "")
    if longest_file > name_max or len(run_name.encode()) > name_max:
        raise ValueError(f"lora_name is {len(name)} characters long; the files it names "
                         f"({name[:20]}..._reference.safetensors) must stay within {name_max} bytes: "
                         f"use at most {name_max - max(len(s) for s in SUFFIXES)} characters")
    path_max = _limit(folders.loras if os.path.isdir(folders.loras) else "/", "PC_PATH_MAX", DEFAULT_PATH_MAX)
    run_path = folders.run + (".run9999" if folders.earlier_run == MOVE_ASIDE else "")
    longest = max(len(os.path.join(folders.loras, name + SUFFIXES[1]).encode()),
                  len(os.path.join(run_path, "step_000000.nonfinite").encode()))
    if longest >= path_max:
        raise ValueError(f"lora_name {name[:40]!r}...: the full paths of the run's files would be {longest} "
                         f"bytes, over the limit of {path_max}; use a shorter name")
    # The node's run folder may be moved aside and made again: its parent must be writable.
    runs = ("the training output folder", os.path.dirname(folders.run)) if folders.earlier_run == MOVE_ASIDE \
        else ("the run folder", folders.run)
    if os.path.exists(folders.run) and not os.path.isdir(folders.run):
        raise ValueError(f"the run folder {folders.run} is a file, not a folder; the checkpoints would be lost")
    checks = [runs] if folders.loras == folders.run else [("the LoRA folder", folders.loras), runs]
    for what, folder in checks:
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ValueError(f"{what} {folder} is a file, not a folder; the LoRA would be lost at the end of training")
        try:
            os.makedirs(folder, exist_ok=True)
            os.unlink(temp_path_in(folder))
        except OSError as error:
            raise ValueError(f"{what} {folder} cannot be written ({error.strerror or error}); "
                             f"the LoRA would be lost at the end of training") from None


def written_by_eligen(path):
    """Whether the safetensors file at ``path`` is a LoRA this package's training wrote."""
    try:
        with safe_open(path, framework="pt") as handle:
            return "eligen_training" in (handle.metadata() or {})
    except Exception:  # not safetensors, damaged, unreadable: not ours
        return False


def check_foreign_loras(name, folders, write_reference):
    """Refuse to replace a LoRA file that no EliGen training run wrote (e.g. one the user downloaded)."""
    for suffix in SUFFIXES[: 2 if write_reference else 1]:
        path = os.path.join(folders.loras, name + suffix)
        if os.path.exists(path) and not written_by_eligen(path):
            raise ValueError(f"lora_name {name!r}: {path} already exists and was not written by EliGen training "
                             f"(no 'eligen_training' metadata), so it is not replaced; choose another lora_name "
                             f"or move that file away")


def moved_runs(run_dir):
    """Folders ``<run_dir>.run<N>`` that later runs of the same name moved aside, oldest first."""
    parent, base = os.path.split(os.path.abspath(run_dir))
    pattern = re.compile(re.escape(base) + r"\.run(\d+)")
    try:
        found = [(int(m.group(1)), os.path.join(parent, f)) for f in os.listdir(parent) if (m := pattern.fullmatch(f))]
    except OSError:
        return []
    return [path for _, path in sorted(found)]


def _moved_hint(run_dir, name=None):
    """Where the checkpoints went when a later run of the same name moved this run aside."""
    moved = [(path, checkpoint_steps(path)) for path in moved_runs(run_dir)
             if name is None or os.path.exists(os.path.join(path, name))]
    listed = "; ".join(f"{path} (steps {', '.join(map(str, steps))})" for path, steps in moved if steps)
    if not listed:
        return ""
    return (f"; a later run of this name moved earlier runs aside: {listed}. To continue one, train in its "
            f"folder: lora_name '{os.path.basename(moved[-1][0])}' on the node, --run-dir {moved[-1][0]} on the "
            f"command line")


def resolve_resume(run_dir, resume, steps):
    """The checkpoint a run resumes from (``resume``: "latest" or a file name), which must be before
    ``steps``; the messages say where moved-aside runs went and how to train further."""
    if resume == "latest":
        path = latest_checkpoint(run_dir) if os.path.isdir(run_dir) else None
        if path is None:
            raise ValueError(f"resume: there is no checkpoint yet in {run_dir}{_moved_hint(run_dir)}")
    else:
        try:
            path = resolve_checkpoint(run_dir, resume)
        except ValueError as error:
            if not FILE_PATTERN.fullmatch(resume):
                raise
            raise ValueError(f"resume: {error}{_moved_hint(run_dir, resume)}") from None
    step = checkpoint_step(path)
    if steps is not None and step >= steps:
        raise ValueError(f"resume: checkpoint {path} is at step {step} and steps is {steps}, so there is nothing "
                         f"left to train; set steps above {step} to train further")
    return path


def _next_archive(run_dir):
    n = 1
    while os.path.exists(f"{run_dir}.run{n}"):
        n += 1
    return f"{run_dir}.run{n}"


def _move_earlier_run_aside(name, folders):
    archive = _next_archive(folders.run)
    os.replace(folders.run, archive)
    lora_file = os.path.join(folders.loras, name + SUFFIXES[0])
    if os.path.isfile(lora_file):
        kept = os.path.join(archive, MOVED_LORA)
        try:
            os.link(lora_file, kept)  # the new run replaces the file in the LoRA folder, not this link
        except OSError:
            shutil.copy2(lora_file, kept)
    logging.warning("EliGen training: lora_name %r was used by an earlier run; that run is kept in %s "
                    "and this new run starts empty (set resume to 'latest' to continue a run instead)",
                    name, archive)


def _refuse_earlier_run(name, folders):
    held = [f for f in os.listdir(folders.run) if RUN_FILES.fullmatch(f)]
    if folders.loras == folders.run and os.path.isfile(os.path.join(folders.run, name + SUFFIXES[0])):
        held.append(name + SUFFIXES[0])
    held.sort()
    if held:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise ValueError(f"the run folder {folders.run} already holds a run ({shown}); nothing was overwritten. "
                         f"To continue that run, resume 'latest' (--resume latest); to start a new one, choose "
                         f"another run folder (--run-dir)")


def prepare_outputs(name, folders, resume=None, steps=None, write_reference=False):
    """Check everything about the outputs of a run before any work and settle an earlier run in the run
    folder (see the module docstring). Returns the plain LoRA name; ValueError naming the item if not."""
    name = plain_lora_name(name)
    check_output_paths(name, folders)
    check_foreign_loras(name, folders, write_reference)
    if resume:
        resolve_resume(folders.run, resume, steps)
    elif os.path.isdir(folders.run) and os.listdir(folders.run):
        if folders.earlier_run == MOVE_ASIDE:
            _move_earlier_run_aside(name, folders)
        else:
            _refuse_earlier_run(name, folders)
    for folder in (folders.loras, folders.run):
        for path in remove_stale_temp_files(folder):
            logging.info("EliGen training: removed %s, left by a process that stopped while writing", path)
    return name
