"""The multiprocess directory itself: create or check it, wipe it on a cold start, set damaged files aside.

Called by the master before anything is written (``ensure_directory``,
``wipe_stale_files``), and by any process that meets a damaged file
(``quarantine``). File names come from promfork.directory.filenames.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import tempfile

from promfork.directory import filenames, ownership

log = logging.getLogger(__name__)
_created: set[str] = set()  # configured directories this process created


class MultiprocDirError(RuntimeError):
    """The multiprocess directory cannot be used; the message says how to fix it."""


def ensure_directory(path: str | None) -> str:
    """Return a usable multiprocess directory, creating a private one when `path` is None.

    A configured directory must be a real directory (not a symlink), writable by
    us and not writable by everyone; it is created (mode 0700) when missing.
    """
    if path is None:
        # RAM-backed when possible: metric files are mmap'ed and written on every request,
        # and on a disk the kernel's writeback of those pages costs time for nothing.
        shm = "/dev/shm"
        base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None
        created = tempfile.mkdtemp(prefix="promfork-", dir=base)  # mode 0700
        os.close(ownership.create(os.path.join(created, filenames.PRIVATE_MARKER), os.O_WRONLY))
        return created
    where = f"PROMETHEUS_MULTIPROC_DIR={path!r}"
    if os.path.islink(path):
        raise MultiprocDirError(f"{where} is a symlink; point it at a real directory")
    if not os.path.exists(path):
        try:
            os.makedirs(path, mode=0o700)
            _created.add(os.path.realpath(path))
        except OSError as exc:
            raise MultiprocDirError(f"{where} does not exist and cannot be created: {exc.strerror}") from None
    if not os.path.isdir(path):
        raise MultiprocDirError(f"{where} is not a directory")
    mode = os.stat(path).st_mode
    if mode & stat.S_IWOTH:
        raise MultiprocDirError(f"{where} is world-writable; use a private directory (chmod 700)")
    _check_writable(path, where)
    return path


def _check_writable(path: str, where: str) -> None:
    # os.access misses read-only mounts and full disks; write a real page instead.
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".probe-")
    except OSError as exc:
        raise MultiprocDirError(f"{where} is not writable: {exc.strerror}") from None
    try:
        os.write(fd, b"\0" * 4096)
    except OSError as exc:
        hint = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror
        raise MultiprocDirError(f"{where} cannot hold metric files: {hint}") from None
    finally:
        os.close(fd)
        os.unlink(probe)


def created_here(path: str) -> bool:
    """True when this process created the configured directory `path` (it did not exist)."""
    return os.path.realpath(path) in _created


def is_private(path: str) -> bool:
    """True when promfork created `path` itself and may delete it when the last master exits."""
    return os.path.exists(os.path.join(path, filenames.PRIVATE_MARKER))


def wipe_stale_files(path: str, keep_pid: int | None = None) -> int:
    """Delete every metric, exemplar, journal and scratch file of an earlier run but `keep_pid`'s; return how many."""
    removed = 0
    for entry in os.scandir(path):
        if filenames.is_stale(entry.name, keep_pid) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    return removed


def quarantine(directory: str, name: str, reason: str) -> str | None:
    """Move a damaged file out of the way (kept for inspection) and log it; return its new path.

    None when it cannot be moved (gone already, or no room for the quarantine folder).
    """
    target_dir = os.path.join(directory, filenames.QUARANTINE)
    target = os.path.join(target_dir, name)
    try:
        ownership.make_directory(target_dir)
        os.replace(os.path.join(directory, name), target)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("promfork: damaged metric file %s (%s) cannot be set aside: %s", name, reason, exc)
        return None
    log.error("promfork: set aside damaged metric file %s (%s); moved to %s", name, reason, target)
    return target
