"""The multiprocess directory: create or check it, wipe it on a cold start, and lock it.

Two advisory locks (flock) live in the directory:

* ``.masters.lock`` -- every Gunicorn master holds it shared for its whole life.
  A master that can take it exclusively is alone (a cold start) and may wipe
  files left by an earlier run; one that cannot is sharing the directory with a
  live master (USR2 binary upgrade) and must keep every file. Workers inherit
  the master's descriptor across fork, so the lease also stays held while
  orphaned workers of a dead master are still writing. ``exec`` (USR2) does not
  inherit it: Python opens files close-on-exec.
* ``.files.lock`` -- scrapes hold it shared while they read the files;
  compaction holds it exclusively while it changes them. This is what lets a
  scrape see each dead worker's values exactly once.
* ``.intent.lock`` -- gives compaction priority over a stream of overlapping
  scrapes (flock has no writer preference): a compactor takes it exclusively
  before waiting for the files lock, and a scrape passes through it shared
  before taking the files lock, so new scrapes queue behind a waiting
  compactor instead of starving it. The compactor waits a bounded time only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
import threading
import time
from collections.abc import Iterator

from promfork.writer.exemplars import is_exemplar_file

MASTERS_LOCK = ".masters.lock"
FILES_LOCK = ".files.lock"
INTENT_LOCK = ".intent.lock"
PRIVATE_MARKER = ".promfork-private"

# Descriptors holding a transient lock. A fork while one is held copies it into
# the child; the child closes its copy so it can never keep the lock alive
# (flock locks belong to the open file description, shared with the parent).
_held_fds: set[int] = set()


def _close_inherited_lock_fds() -> None:
    for fd in list(_held_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_inherited_lock_fds)

# prometheus-client guards each process's metric files with a plain threading.Lock.
# If a background thread of the Gunicorn master were inside a metric update at the
# instant the master forks, the worker would inherit that lock held and hang on its
# first metric update. Threads update metrics under fork_guard; fork waits for it.
fork_guard = threading.Lock()
os.register_at_fork(before=fork_guard.acquire, after_in_parent=fork_guard.release, after_in_child=fork_guard.release)


class MultiprocDirError(RuntimeError):
    """The multiprocess directory cannot be used; the message says how to fix it."""


class LockTimeout(TimeoutError):
    """A lock on the multiprocess directory was not granted in time."""


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
        os.close(os.open(os.path.join(created, PRIVATE_MARKER), os.O_WRONLY | os.O_CREAT, 0o600))
        return created
    where = f"PROMETHEUS_MULTIPROC_DIR={path!r}"
    if os.path.islink(path):
        raise MultiprocDirError(f"{where} is a symlink; point it at a real directory")
    if not os.path.exists(path):
        try:
            os.makedirs(path, mode=0o700)
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


def is_private(path: str) -> bool:
    """True when promfork created `path` itself and may delete it when the last master exits."""
    return os.path.exists(os.path.join(path, PRIVATE_MARKER))


def wipe_stale_files(path: str, keep_pid: int | None = None) -> int:
    """Delete every metric, exemplar, journal and scratch file of an earlier run but `keep_pid`'s; return how many."""
    removed = 0
    kept = (f"_{keep_pid}.db", f"_{keep_pid}.bin")
    for entry in os.scandir(path):
        if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
            continue
        if keep_pid is not None and entry.name.endswith(kept):
            continue
        stale = entry.name.endswith((".db", ".new", ".journal", ".journal.tmp", ".exit", ".slot"))
        if stale or is_exemplar_file(entry.name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    return removed


class MasterLease:
    """A master's shared hold on the directory; tells whether this start is cold."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lease; return True when no other master uses the directory (cold start)."""
        fd = os.open(os.path.join(self.path, MASTERS_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except BlockingIOError:
            alone = False
        if alone:
            # Caller wipes while we hold it exclusively; keep() downgrades.
            self._fd = fd
            return True
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._fd = fd
        return False

    def keep(self) -> None:
        """Downgrade to a shared hold so that a second master (USR2) can join."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_SH)

    def release_if_last(self) -> bool:
        """Release the lease; return True when no other master (or its workers) still holds it."""
        if self._fd is None:
            return False
        if not os.path.exists(self.path):
            os.close(self._fd)
            self._fd = None
            return True
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            last = True
        except BlockingIOError:
            last = False
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        return last


class DirectoryLock:
    """The files lock: shared for readers of the metric files, exclusive for compaction."""

    def __init__(self, path: str) -> None:
        self.lock_path = os.path.join(path, FILES_LOCK)
        self.intent_path = os.path.join(path, INTENT_LOCK)

    @staticmethod
    def _acquire(path: str, exclusive: bool, deadline: float) -> int | None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        delay = 0.0005
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                _held_fds.add(fd)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return None
                time.sleep(delay)
                delay = min(delay * 2, 0.01)

    @staticmethod
    def _release(fd: int) -> None:
        _held_fds.discard(fd)
        try:
            # Unlock explicitly: a child forked meanwhile may still hold a copy of fd.
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _lock(self, exclusive: bool, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        intent = self._acquire(self.intent_path, exclusive, deadline)
        if intent is None:
            return None
        try:
            return self._acquire(self.lock_path, exclusive, deadline)
        finally:
            self._release(intent)

    @contextlib.contextmanager
    def hold(self, exclusive: bool, timeout: float) -> Iterator[None]:
        """Hold the lock, waiting up to `timeout` seconds; raise LockTimeout otherwise."""
        fd = self._lock(exclusive, timeout)
        if fd is None:
            kind = "exclusively" if exclusive else "shared"
            raise LockTimeout(f"could not lock {self.lock_path} {kind} within {timeout:.1f}s")
        try:
            yield
        finally:
            self._release(fd)

    @contextlib.contextmanager
    def try_exclusive(self, wait: float = 0.0) -> Iterator[bool]:
        """Hold the lock exclusively if it comes free within `wait` seconds; yield whether it was taken."""
        fd = self._lock(exclusive=True, timeout=wait)
        try:
            yield fd is not None
        finally:
            if fd is not None:
                self._release(fd)


class ImportOrderError(RuntimeError):
    """prometheus-client chose its value class before PROMETHEUS_MULTIPROC_DIR was set."""


def ensure_multiprocess_mode() -> None:
    """Refuse to run when prometheus-client's storage mode disagrees with the environment.

    prometheus-client decides once, when first imported, whether values live in
    per-process files (PROMETHEUS_MULTIPROC_DIR set) or in memory. If the variable
    is set only after that import, every worker keeps its numbers to itself and
    /metrics silently shows one worker's share. Failing here turns that silent
    bug into a start-up error.
    """
    # Imported here, not at module level: this module is loaded by gunicorn.conf.py
    # before the directory variable is exported.
    from prometheus_client import values

    in_files = getattr(values.ValueClass, "_multiprocess", False)
    wanted = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    if wanted and not in_files:
        raise ImportOrderError(
            "prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set, so each worker "
            "would report only its own numbers. Set PROMETHEUS_MULTIPROC_DIR before anything imports "
            "prometheus_client (start with `gunicorn -c gunicorn.conf.py`, which does it first), and do "
            "not import prometheus_client at the top of your gunicorn config."
        )
    if in_files and not wanted:
        raise ImportOrderError(
            "prometheus_client is in multiprocess mode but PROMETHEUS_MULTIPROC_DIR is no longer set; "
            "do not remove it from the environment after start"
        )
