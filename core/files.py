"""Atomic file writes: every file the package writes goes to a temp file in the target folder first and is
moved over the target with ``os.replace``, so an interrupted write never leaves a half-written file.

Each write gets a private temp folder ``.eligen-tmp.<host>.<pid>.<process>-<random>.part`` beside the target and
writes ``content.part`` inside it. Libraries that make their own temp file next to the path they are given
(safetensors writes ``.tmpXXXXXX`` and renames it) therefore make it inside that folder too, so whatever a
killed write leaves is in one folder that a later write recognises by name. No name involved ends with an
extension ComfyUI lists (models, images, workflows), so no file list ever offers a half-written file; the
host and process id let a later write in the same folder remove temps whose process died (``kill -9``,
power loss), and only those.
"""

import errno
import hashlib
import json
import os
import re
import socket
import stat
import time
from contextlib import contextmanager

TEMP_PREFIX = ".eligen-tmp."
TEMP_SUFFIX = ".part"
CONTENT_NAME = "content.part"  # the file a write fills inside its temp folder
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
# This process, among those that had its pid: a container restarted on the same folders often gives the
# new ComfyUI the old one's pid, and the temps of that dead process must not pass for this one's.
_PROCESS = os.urandom(4).hex()
# A temp folder (this version) or a temp file (earlier versions, no process token), both removed when
# their process is dead.
_TEMP_NAME = re.compile(r"\.eligen-tmp\.([0-9a-f]{8})\.(\d+)\.(?:([0-9a-f]{8})-)?[0-9a-z]+\.part")
# Temps of earlier versions, removed when over LEGACY_TEMP_AGE_S old (their process is unknown):
# tempfile.mkstemp(prefix=".tmp-", suffix=<the target's extension>) ...
_LEGACY_TEMP_NAME = re.compile(r"\.tmp-[a-z0-9_]{8}\.[A-Za-z0-9]+")
# ... and safetensors' own temp (Rust tempfile: ".tmp" + 6 letters or digits) made beside a target when
# the target was still a plain file; it is ours only when its header carries this package's metadata.
_SAFETENSORS_TEMP_NAME = re.compile(r"\.tmp[A-Za-z0-9]{6}")
OUR_METADATA_PREFIXES = ("eligen_", "toy_world")
LEGACY_TEMP_AGE_S = 3600
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on a header
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
DISK_FULL_TEXTS = ("no space left", "file too large", "disk quota exceeded")
_swept = set()


class DiskFullError(OSError):
    """A write failed for lack of space (or a file-size limit); the message says which file and folder."""


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: keep its file
    return True


def _old(path):
    try:
        return time.time() - os.lstat(path).st_mtime > LEGACY_TEMP_AGE_S
    except OSError:
        return False


def _is_our_safetensors_temp(path):
    """Whether ``path`` is a regular file whose safetensors header names this package's metadata."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):  # no links, no pipes (opening one would block)
            return False
        with open(path, "rb") as handle:
            size = handle.read(8)
            if len(size) != 8 or not 2 <= int.from_bytes(size, "little") <= MAX_HEADER_BYTES:
                return False
            header = json.loads(handle.read(int.from_bytes(size, "little")))
    except (OSError, ValueError):
        return False
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(metadata, dict) and any(key.startswith(OUR_METADATA_PREFIXES) for key in metadata)


def stale_temp_files(folder):
    """Temps in ``folder`` this package's writes left behind: temp folders and files of a dead process of
    this host, and temps of earlier versions over an hour old (``.tmp-*``, and safetensors' ``.tmpXXXXXX``
    when its header holds our metadata). Anything else, a user's file included, is never listed."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    stale = []
    for name in names:
        path = os.path.join(folder, name)
        match = _TEMP_NAME.fullmatch(name)
        if match:
            host, pid, process = match.group(1), int(match.group(2)), match.group(3)
            if pid == os.getpid():
                dead = process is not None and process != _PROCESS  # an earlier holder of this pid
            else:
                dead = not _process_alive(pid)
            if host == _HOST and dead:
                stale.append(path)
        elif _LEGACY_TEMP_NAME.fullmatch(name):
            if _old(path):
                stale.append(path)
        elif _SAFETENSORS_TEMP_NAME.fullmatch(name):
            if _old(path) and _is_our_safetensors_temp(path):
                stale.append(path)
    return stale


def _remove_temp(path):
    """Unlink a temp file, or empty and remove a temp folder (its files only: it never holds folders)."""
    if os.path.isdir(path) and not os.path.islink(path):
        with os.scandir(path) as entries:
            for entry in entries:
                if not entry.is_dir(follow_symlinks=False):
                    os.unlink(entry.path)
        os.rmdir(path)
    else:
        os.unlink(path)


def remove_stale_temp_files(folder):
    """Remove what ``stale_temp_files`` finds; returns the removed paths (a file gone already is fine)."""
    removed = []
    for path in stale_temp_files(folder):
        try:
            _remove_temp(path)
            removed.append(path)
        except FileNotFoundError:
            pass
        except OSError:
            pass  # not ours to remove after all (permissions, a folder inside): leave it
    return removed


def _new_temp(folder, make):
    """A new temp name in ``folder`` that ``make(path)`` creates exclusively (FileExistsError: try again)."""
    while True:
        name = f"{TEMP_PREFIX}{_HOST}.{os.getpid()}.{_PROCESS}-{os.urandom(5).hex()}{TEMP_SUFFIX}"
        path = os.path.join(folder, name)
        try:
            make(path)
            return path
        except FileExistsError:
            continue


def temp_path_in(folder):
    """A new, unused temp file path in ``folder`` (the file is created empty)."""
    return _new_temp(folder, lambda path: os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)))


def is_disk_full(error):
    """Whether ``error`` (OSError, or a library error that only carries the OS text) means "no space"."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    text = str(error).lower()
    return any(part in text for part in DISK_FULL_TEXTS)


def disk_full_error(path, error):
    folder = os.path.dirname(os.path.abspath(path))
    return DiskFullError(
        errno.ENOSPC,
        f"writing {path} failed: the disk is full or a file-size limit was reached in {folder} "
        f"({type(error).__name__}: {error}); free some space there and run again (the previous "
        f"{os.path.basename(path)}, if any, is unchanged)")


@contextmanager
def atomic_path(path):
    """Yields a temp path (``content.part`` in a private temp folder beside ``path``); on success it
    replaces ``path``, and the temp folder is removed either way, with any temp a library made in it.
    A failure for lack of space is raised as ``DiskFullError`` naming ``path`` and its folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if folder not in _swept:  # once per folder and process: cache folders hold many files
        _swept.add(folder)
        remove_stale_temp_files(folder)
    try:
        temp_folder = _new_temp(folder, lambda name: os.mkdir(name, 0o700))
    except OSError as error:
        if is_disk_full(error):
            raise disk_full_error(path, error) from error
        raise
    temp = os.path.join(temp_folder, CONTENT_NAME)
    try:
        yield temp
        os.chmod(temp, 0o666 & ~_umask())  # library temps are 0600; give the file the usual permissions
        os.replace(temp, path)
    except BaseException as error:
        if isinstance(error, Exception) and not isinstance(error, DiskFullError) and is_disk_full(error):
            raise disk_full_error(path, error) from error
        raise
    finally:
        try:
            _remove_temp(temp_folder)
        except OSError:
            pass  # a later write in this folder removes it (its process will have ended)


def write_text(path, text):
    with atomic_path(path) as temp:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)
    return path
