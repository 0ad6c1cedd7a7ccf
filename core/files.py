"""Atomic file writes: every file the package writes goes to a temp file in the target folder first and is
moved over the target with ``os.replace``, so an interrupted write never leaves a half-written file.

Temp files are named ``.eligen-tmp.<host>.<pid>.<random>.part``: the ``.part`` ending is not one that
ComfyUI lists as a model (so a LoRA loader never offers a half-written file), and the host and process id
let a later write in the same folder remove temps whose process died (``kill -9``, power loss).
"""

import errno
import hashlib
import os
import re
import socket
import time
from contextlib import contextmanager

TEMP_PREFIX = ".eligen-tmp."
TEMP_SUFFIX = ".part"
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMP_NAME = re.compile(r"\.eligen-tmp\.([0-9a-f]{8})\.(\d+)\.[0-9a-z]+\.part")
# Temps of earlier versions (tempfile.mkstemp(prefix=".tmp-", suffix=<the target's extension>)).
_LEGACY_TEMP_NAME = re.compile(r"\.tmp-[a-z0-9_]{8}\.[A-Za-z0-9]+")
LEGACY_TEMP_AGE_S = 3600
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


def stale_temp_files(folder):
    """Temp files in ``folder`` left by a dead process of this host (or old-style temps over an hour old)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    stale = []
    for name in names:
        match = _TEMP_NAME.fullmatch(name)
        if match:
            if match.group(1) == _HOST and int(match.group(2)) != os.getpid() and not _process_alive(int(match.group(2))):
                stale.append(os.path.join(folder, name))
        elif _LEGACY_TEMP_NAME.fullmatch(name):
            path = os.path.join(folder, name)
            try:
                if time.time() - os.path.getmtime(path) > LEGACY_TEMP_AGE_S:
                    stale.append(path)
            except OSError:
                pass
    return stale


def remove_stale_temp_files(folder):
    """Remove what ``stale_temp_files`` finds; returns the removed paths (a file gone already is fine)."""
    removed = []
    for path in stale_temp_files(folder):
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
        except OSError:
            pass  # not ours to remove after all (permissions): leave it
    return removed


def temp_path_in(folder):
    """A new, unused temp file path in ``folder`` (the file is created empty)."""
    while True:
        name = f"{TEMP_PREFIX}{_HOST}.{os.getpid()}.{os.urandom(5).hex()}{TEMP_SUFFIX}"
        path = os.path.join(folder, name)
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            return path
        except FileExistsError:
            continue


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
    """Yields a temp path beside ``path``; on success it replaces ``path``, on failure it is removed.
    A failure for lack of space is raised as ``DiskFullError`` naming ``path`` and its folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if folder not in _swept:  # once per folder and process: cache folders hold many files
        _swept.add(folder)
        remove_stale_temp_files(folder)
    try:
        temp = temp_path_in(folder)
    except OSError as error:
        if is_disk_full(error):
            raise disk_full_error(path, error) from error
        raise
    try:
        yield temp
        os.chmod(temp, 0o666 & ~_umask())  # the temp is 0600; give the file the usual permissions
        os.replace(temp, path)
    except BaseException as error:
        if os.path.exists(temp):
            os.unlink(temp)
        if isinstance(error, Exception) and not isinstance(error, DiskFullError) and is_disk_full(error):
            raise disk_full_error(path, error) from error
        raise


def write_text(path, text):
    with atomic_path(path) as temp:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)
    return path
