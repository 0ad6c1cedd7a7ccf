"""Where a training run writes, checked before the first step.

Files of a run named ``<name>``:
- ``models/loras/<name>.safetensors`` (and ``<name>_reference.safetensors``): the trained LoRA;
- ``output/eligen_training/<name>/``: the run folder (checkpoints, ``latest.json``).

**Same name twice.** ``resume`` empty starts a *new* run. When ``<name>`` already has a run folder, that
folder is kept, renamed ``<name>.run<N>`` (the lowest free N), together with a hard link (or copy) of the
LoRA file it produced, and the new run gets an empty ``<name>/``. So checkpoints of two runs never share
a folder (pruning cannot delete another run's files), ``resume: latest`` always means the newest run,
and nothing a previous run wrote is deleted; only ``models/loras/<name>.safetensors`` is replaced, when
the new run saves its LoRA. ``resume`` set continues the run in ``<name>/``.

Everything about the output is checked before any work: the name (empty, NUL and control characters,
path separators, names reserved on Windows, a trailing dot or space, the length of every file name the
run writes and of the full paths) and that both folders can be written.
"""

import logging
import os
import shutil

from ..core.files import remove_stale_temp_files, temp_path_in

SUFFIXES = (".safetensors", "_reference.safetensors")  # the LoRA files a run writes in models/loras
RUN_SUFFIX_ROOM = len(".run9999")
FORBIDDEN = '/\\:*?"<>|'
WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
DEFAULT_NAME_MAX = 255
DEFAULT_PATH_MAX = 4096


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
    if not name or name in (".", "..") or name.startswith("."):
        raise ValueError(f"lora_name {shown} must be a plain file name (not empty, not starting with a dot)")
    bad = sorted({c for c in name if c in FORBIDDEN})
    if bad:
        raise ValueError(f"lora_name {shown} must be a plain file name (no folders, no special characters: "
                         f"{' '.join(bad)})")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError(f"lora_name {shown} must be a plain file name (it holds a NUL or another control character)")
    if name.split(".")[0].lower() in WINDOWS_RESERVED:
        raise ValueError(f"lora_name {shown} must be a plain file name ({name.split('.')[0]!r} is a reserved "
                         f"device name on Windows)")
    if name.endswith((".", " ")):
        raise ValueError(f"lora_name {shown} must be a plain file name (it ends with a dot or a space)")
    return name


def check_output_paths(name, loras_dir, runs_dir):
    """Lengths of every file and path the run writes, and that both folders can be written."""
    longest_file = max(len((name + suffix).encode()) for suffix in SUFFIXES)
    name_max = min(_limit(d, "PC_NAME_MAX", DEFAULT_NAME_MAX) for d in (loras_dir, runs_dir) if os.path.isdir(d)) \
        if any(os.path.isdir(d) for d in (loras_dir, runs_dir)) else DEFAULT_NAME_MAX
    if longest_file > name_max or len((name + ".run9999").encode()) > name_max:
        raise ValueError(f"lora_name is {len(name)} characters long; the files it names "
                         f"({name[:20]}..._reference.safetensors) must stay within {name_max} bytes: "
                         f"use at most {name_max - max(len(s) for s in SUFFIXES)} characters")
    path_max = _limit(loras_dir if os.path.isdir(loras_dir) else "/", "PC_PATH_MAX", DEFAULT_PATH_MAX)
    longest = max(len(os.path.join(loras_dir, name + SUFFIXES[1]).encode()),
                  len(os.path.join(runs_dir, name + ".run9999", "step_000000.nonfinite").encode()))
    if longest >= path_max:
        raise ValueError(f"lora_name {name[:40]!r}...: the full paths of the run's files would be {longest} "
                         f"bytes, over the limit of {path_max}; use a shorter name")
    for what, folder in (("the LoRA folder", loras_dir), ("the training output folder", runs_dir)):
        try:
            os.makedirs(folder, exist_ok=True)
            probe = temp_path_in(folder)
            os.unlink(probe)
        except OSError as error:
            raise ValueError(f"{what} {folder} cannot be written ({error.strerror or error}); "
                             f"the LoRA would be lost at the end of training") from None


def _next_archive(runs_dir, name):
    n = 1
    while os.path.exists(os.path.join(runs_dir, f"{name}.run{n}")):
        n += 1
    return os.path.join(runs_dir, f"{name}.run{n}")


def start_run(name, loras_dir, runs_dir, resume):
    """Check the outputs and return the run folder; a new run moves an earlier run of the name aside
    (see the module docstring). Also removes temp files that dead processes left in both folders."""
    name = plain_lora_name(name)
    check_output_paths(name, loras_dir, runs_dir)
    run_dir = os.path.join(runs_dir, name)
    for folder in (loras_dir, run_dir):
        for path in remove_stale_temp_files(folder):
            logging.info("EliGen training: removed %s, left by a process that stopped while writing", path)
    if resume or not os.path.isdir(run_dir) or not os.listdir(run_dir):
        return run_dir
    archive = _next_archive(runs_dir, name)
    os.replace(run_dir, archive)
    lora_file = os.path.join(loras_dir, name + SUFFIXES[0])
    if os.path.isfile(lora_file):
        kept = os.path.join(archive, "lora.safetensors")
        try:
            os.link(lora_file, kept)  # the new run replaces the file in models/loras, not this link
        except OSError:
            shutil.copy2(lora_file, kept)
    logging.warning("EliGen training: lora_name %r was used by an earlier run; that run is kept in %s "
                    "and this new run starts empty (set resume to 'latest' to continue a run instead)",
                    name, archive)
    return run_dir
