"""The locking protocol of the multiprocess directory: every flock promfork takes, in one place.

Three directory locks (their files are named in promfork.directory.filenames):

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

And one lock per value or exemplar file: the process that writes a file holds a
shared lock on it for as long as it has it open (``open_for_writing``);
compaction folds a dead process's file only after taking that lock exclusively
(``claim``), so a file a live process may write is never folded or deleted,
whatever the timing (a reused pid, a fork right after a check).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator

from promfork.directory import filenames, ownership

# Descriptors holding a transient lock (files, intent). A fork while one is held copies it
# into the child, which closes its copy (promfork.forks) so that it can never keep the
# lock alive: flock locks belong to the open file description, shared with the parent.
held_fds: set[int] = set()


def close_inherited_lock_fds() -> None:
    """In a forked child: close the copies of the transient lock descriptors the parent held."""
    for fd in list(held_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    held_fds.clear()


class LockTimeout(TimeoutError):
    """A lock on the multiprocess directory was not granted in time."""


class MasterLease:
    """A master's shared hold on the directory; tells whether this start is cold."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lease; return True when no other master uses the directory (cold start)."""
        fd = ownership.create(os.path.join(self.path, filenames.MASTERS_LOCK), os.O_RDWR)
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
        self.lock_path = os.path.join(path, filenames.FILES_LOCK)
        self.intent_path = os.path.join(path, filenames.INTENT_LOCK)

    @staticmethod
    def _acquire(path: str, exclusive: bool, deadline: float) -> int | None:
        fd = ownership.create(path, os.O_RDWR)
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        delay = 0.0005
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                held_fds.add(fd)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return None
                time.sleep(delay)
                delay = min(delay * 2, 0.01)

    @staticmethod
    def _release(fd: int) -> None:
        held_fds.discard(fd)
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


# Writer locks: a process holds a shared lock on every file it writes; compaction claims exclusively.


def _same_file(fd: int, path: str) -> bool:
    """True when `path` still names the file open as `fd` (it was not renamed or deleted meanwhile)."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (current.st_ino, current.st_dev) == (opened.st_ino, opened.st_dev)


def open_for_writing(path: str, lock_wait: float = 0.0) -> int:
    """Open (or create, mode 0600) the file a process writes, holding a shared lock on it.

    Returns a descriptor whose file is linked at `path` and cannot be claimed by
    compaction while it stays open. Waits up to `lock_wait` seconds (none by
    default: the value store calls this with its lock held, and a sleep there
    would stall every thread, or under gevent every greenlet, of the process)
    while compaction holds the file (a dead process's file, now ours by pid
    reuse); raises OSError(EAGAIN) after that, and the caller retries later. If
    compaction retired or deleted the file meanwhile, opens the new one.
    """
    deadline = time.monotonic() + lock_wait
    while True:
        fd = ownership.create(path, os.O_RDWR)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise OSError(errno.EAGAIN, f"{os.path.basename(path)} is held by compaction") from None
                    time.sleep(0.001)
            if _same_file(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # retired or deleted while we waited: the name now belongs to a new file


def claim(path: str) -> int | None:
    """Lock a dead process's file exclusively for compaction; None if a live process holds it open.

    A process that has the file open through ``open_for_writing`` holds a shared
    lock, so the claim fails and the file is left alone. While the claim is
    held, no process can start writing the file; once it is renamed or deleted,
    no process ever will (they reopen by name and check the inode). The caller
    closes the descriptor when done.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)  # writable: NFS grants an exclusive lock only then
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by a live process (or a filesystem without locks: never fold there)
        os.close(fd)
        return None
    if not _same_file(fd, path):
        release(fd)
        return None
    return fd


def release(fd: int) -> None:
    """Unlock and close a claim (unlocked first: a process forked meanwhile may hold a copy of `fd`)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def is_alive(pid: int) -> bool:
    """True if a process with this pid exists (a zombie not yet reaped counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
