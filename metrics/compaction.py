"""Folds dead workers' metric files into archive files, exactly once and crash-safe.

Protocol (all under the exclusive files lock, so no scrape sees a half-done step):

1. finish any journal left by a crashed run (roll forward), drop stray ``*.new`` files;
2. write each new archive (old archive + dead workers' values) to ``<archive>.new``;
3. commit: write ``compaction.journal`` (temp file, fsync, rename) naming the
   renames and deletions still to do;
4. rename every ``.new`` over its archive, delete the dead workers' files;
5. delete the journal.

A crash before step 3 leaves only ``.new`` files, which the next run deletes: the
dead workers' files are still there and are folded again. A crash after step 3
leaves a journal, which the next run (or the next scrape) replays; every replay
step is idempotent. So a value is counted exactly once at every instant a
reader can observe.

How values fold follows prometheus-client's multiprocess modes: counters,
histograms, summaries and ``sum`` gauges add up; ``max``/``min`` gauges keep the
extreme; ``mostrecent`` keeps the newest timestamp; ``live*`` gauges die with
their process; ``all`` gauges stay in their own per-pid files, as the mode means
("one series per process, alive or dead").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from metrics import dbfiles
from metrics.multiproc import DirectoryLock

log = logging.getLogger("promfork.compaction")

JOURNAL = "compaction.journal"
QUARANTINE = "quarantine"


def _step(name: str) -> None:
    """A named point between compaction steps (tests inject crashes here)."""


@dataclass
class CompactionResult:
    """What one compaction run did."""

    pids: list[int] = field(default_factory=list)
    files_removed: int = 0
    quarantined: list[str] = field(default_factory=list)


def fold(file: dbfiles.DbFile, into: dbfiles.Entries, entries: dbfiles.Entries) -> None:
    """Fold one dead file's entries into an archive's entries, as its kind and mode mean."""
    mode = file.mode
    for key, (value, ts) in entries.items():
        current = into.get(key)
        if current is None:
            into[key] = (value, ts if mode in ("max", "min", "mostrecent") else 0.0)
        elif mode == "max":
            into[key] = max(current, (value, ts), key=lambda e: e[0])
        elif mode == "min":
            into[key] = min(current, (value, ts), key=lambda e: e[0])
        elif mode == "mostrecent":
            if ts > current[1]:
                into[key] = (value, ts)
        else:  # counter, histogram, summary, gauge sum: see dbfiles.add_exact
            into[key] = dbfiles.add_exact(current, value)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_journal(directory: str, journal: dict) -> None:
    tmp = os.path.join(directory, JOURNAL + ".tmp")
    with open(tmp, "w") as out:
        json.dump(journal, out)
        out.flush()
        os.fsync(out.fileno())
    os.rename(tmp, os.path.join(directory, JOURNAL))
    _fsync_dir(directory)


def recover(directory: str) -> bool:
    """Finish a committed compaction or discard an uncommitted one. Caller holds the lock exclusively.

    Returns True when a committed journal was replayed.
    """
    replayed = False
    path = os.path.join(directory, JOURNAL)
    try:
        with open(path) as src:
            journal = json.load(src)
    except FileNotFoundError:
        journal = None
    except ValueError:
        # Only written through an atomic rename, so this is disk damage: the files
        # it named are intact (either state), and deleting it errs on the side of
        # a later re-fold being skipped rather than double counted.
        log.error("promfork: %s is unreadable; discarding it", path)
        journal = None
        os.unlink(path)
    if journal is not None:
        for new, final in journal["renames"]:
            with contextlib.suppress(FileNotFoundError):
                os.rename(os.path.join(directory, new), os.path.join(directory, final))
            _step("replay_renamed")
        for name in journal["delete"]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))
            _step("replay_deleted")
        _fsync_dir(directory)
        os.unlink(path)
        replayed = True
    for entry in os.scandir(directory):
        if entry.name.endswith(".new") or entry.name == JOURNAL + ".tmp":
            os.unlink(entry.path)
    return replayed


def needs_recovery(directory: str) -> bool:
    """True when a crashed compaction left a journal that readers must not read around."""
    return os.path.exists(os.path.join(directory, JOURNAL))


def quarantine(directory: str, name: str, reason: str) -> str:
    """Move a damaged file out of the way (kept for inspection) and log it; return its new path."""
    target_dir = os.path.join(directory, QUARANTINE)
    os.makedirs(target_dir, mode=0o700, exist_ok=True)
    target = os.path.join(target_dir, name)
    os.replace(os.path.join(directory, name), target)
    log.error("promfork: set aside damaged metric file %s (%s); moved to %s", name, reason, target)
    return target


def compact_dead_workers(directory: str, pids: Iterable[int]) -> CompactionResult:
    """Fold the files of the dead processes `pids` into the archives. Caller holds the lock exclusively."""
    recover(directory)
    _step("recovered")
    wanted = {str(pid) for pid in pids}
    result = CompactionResult()
    files = [f for f in map(dbfiles.parse_name, os.listdir(directory)) if f and f.owner in wanted]
    archives: dict[str, dbfiles.Entries] = {}
    delete: list[str] = []
    for file in files:
        if file.mode in ("all", "liveall") or file.is_live_gauge:
            if file.mode != "all":
                delete.append(file.name)
            continue
        try:
            entries = dbfiles.read_entries(os.path.join(directory, file.name))
        except dbfiles.CorruptFile as exc:
            result.quarantined.append(quarantine(directory, file.name, str(exc)))
            continue
        archive = archives.get(file.prefix)
        if archive is None:
            archive = archives[file.prefix] = _read_archive(directory, file.prefix, result)
        fold(file, archive, entries)
        delete.append(file.name)
    renames = []
    for prefix, entries in archives.items():
        final = dbfiles.archive_name(prefix)
        dbfiles.write_entries(os.path.join(directory, final + ".new"), entries)
        renames.append((final + ".new", final))
    _step("archives_written")
    if delete or renames:
        _write_journal(directory, {"renames": renames, "delete": delete})
        _step("journal_committed")
        recover(directory)
        _step("done")
    result.pids = sorted(int(p) for p in wanted if any(f.owner == p for f in files))
    result.files_removed = len(delete)
    return result


def _read_archive(directory: str, prefix: str, result: CompactionResult) -> dbfiles.Entries:
    name = dbfiles.archive_name(prefix)
    try:
        return dbfiles.read_entries(os.path.join(directory, name))
    except FileNotFoundError:
        return {}
    except dbfiles.CorruptFile as exc:
        result.quarantined.append(quarantine(directory, name, str(exc)))
        return {}


def pids_with_files(directory: str) -> set[int]:
    """Every process that has metric files in `directory` that compaction would fold or drop."""
    pids = set()
    for name in os.listdir(directory):
        parsed = dbfiles.parse_name(name)
        # "all" gauges outlive their process by design; they never need folding.
        if parsed is not None and parsed.pid is not None and parsed.mode != "all":
            pids.add(parsed.pid)
    return pids


def is_alive(pid: int) -> bool:
    """True if a process with this pid exists (a zombie not yet reaped counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Compactor:
    """Runs compaction in a background thread of the Gunicorn master.

    `worker_died` only records a pid and wakes the thread, so the master's loop is
    never blocked: the thread waits a bounded time for the files lock and, if a
    scrape (even a hung one) keeps it, retries later. Every `scan_interval` seconds it also looks
    for files of processes that died unseen (a master killed with -9, a worker
    Gunicorn never reported) and folds those.
    """

    def __init__(
        self,
        directory: str,
        protected: Callable[[], set[int]],
        on_compacted: Callable[[CompactionResult], None] | None = None,
        scan_interval: float = 30.0,
        retry_delay: float = 0.05,
        lock_wait: float = 0.5,
    ) -> None:
        self.directory = directory
        self.lock = DirectoryLock(directory)
        self._protected = protected
        self._on_compacted = on_compacted
        self._scan_interval = scan_interval
        self._retry_delay = retry_delay
        self._lock_wait = lock_wait
        self._pending: set[int] = set()
        self._mutex = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def worker_died(self, pid: int) -> None:
        """Record that `pid` exited; its files are folded soon after. Safe to call from any thread."""
        with self._mutex:
            self._pending.add(pid)
        self._wake.set()

    def find_orphans(self) -> set[int]:
        """Pids with files whose process no longer exists and is not ours to keep."""
        protected = self._protected()
        return {pid for pid in pids_with_files(self.directory) if pid not in protected and not is_alive(pid)}

    def run_once(self) -> CompactionResult | None:
        """Fold every pending pid once the lock is free; None (pids kept pending) if it stays busy."""
        with self._mutex:
            pids = set(self._pending)
        # A dead worker's pid may already belong to a new worker: its files are then
        # live again (prometheus-client continues a file it finds), so leave them.
        reused = pids & self._protected()
        if reused:
            with self._mutex:
                self._pending -= reused
            pids -= reused
        with self.lock.try_exclusive(self._lock_wait) as locked:
            if not locked:
                return None
            result = compact_dead_workers(self.directory, pids)
        with self._mutex:
            self._pending -= pids
        if self._on_compacted is not None and (result.pids or result.quarantined):
            self._on_compacted(result)
        return result

    def start(self) -> None:
        """Start the background thread (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="promfork-compactor", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread after a last attempt to fold what is pending."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        next_scan = 0.0
        while True:
            now = time.monotonic()
            if now >= next_scan:
                try:
                    for pid in self.find_orphans():
                        self.worker_died(pid)
                except OSError as exc:
                    log.error("promfork: cannot scan %s for dead workers: %s", self.directory, exc)
                next_scan = now + self._scan_interval
            busy = False
            if self._pending:
                try:
                    busy = self.run_once() is None
                except Exception:  # keep the thread alive; the journal makes a retry safe
                    log.exception("promfork: compaction failed; will retry")
                    busy = True
            if self._stop.is_set() and (not busy or not self._pending):
                return
            self._wake.wait(self._retry_delay if busy else max(0.0, next_scan - time.monotonic()))
            self._wake.clear()
