"""Folds dead workers' metric files into archive files, exactly once, crash-safe, and never a live file.

Protocol (all under the exclusive files lock, so no scrape sees a half-done step):

1. finish any journal left by a crashed run (roll forward), drop stray ``*.new`` files;
2. claim each file of the dead pids: lock it exclusively (``locks.claim``).
   A live process holds a shared lock on every file it writes (promfork's value
   store takes it when it opens the file), so a failed claim means the pid is
   alive again (pid reuse, a second master's worker during USR2, a fork right
   after the death was reported) and that file is left alone. A claimed file
   is then *retired*: renamed to ``<kind>_<pid>-<inode>.db``, a name no process
   ever opens. From that instant it can only be read, never written: a process
   that reuses the pid and opens ``<kind>_<pid>.db`` gets a new file (the
   writer re-checks the name after taking its lock). ``live*`` and ``all``
   gauges are deleted instead (see below);
3. write each new archive (old archive + every retired file's values) to ``<archive>.new``;
4. commit: write ``compaction.journal`` (temp file, fsync, rename) naming the
   renames and deletions still to do;
5. rename every ``.new`` over its archive, delete the retired files;
6. delete the journal.

So the safety of pid reuse rests on the lock, not on timing: a file a live
process may write is never folded or deleted. A crash before step 4 leaves
retired files (readers count them like any dead worker's file, and the next run
folds them) and ``.new`` files (deleted). A crash after step 4 leaves a
journal, which the next run (or the next scrape) replays; every replay step is
idempotent, and it only deletes retired files, which nobody can have reopened.
So a value is counted exactly once at every instant a reader can observe. A run
that cannot write (disk full) leaves the same state as a crash before step 4
and raises OSError; the compactor retries.

How values fold follows prometheus-client's multiprocess modes: counters,
histograms, summaries and ``sum`` gauges add up (inf and nan as IEEE addition
gives them); ``max``/``min`` gauges keep the extreme; ``mostrecent`` keeps the
newest timestamp; ``live*`` gauges die with their process. ``all`` gauges (the
mode prometheus-client gives a Gauge by default: one series per process, alive
or dead) die with their process too: kept, they would add a series for every
worker that ever lived. The first time the compactor drops one it logs the
gauge's name and the modes that aggregate instead.

Exemplar files (``exemplars_<pid>.bin``, promfork.writer.exemplars) of the same dead
pids are folded after the values, in the same run and under the same lock:
each is claimed like a value file, merged into ``exemplars_archive.bin`` (the
most recent exemplar per bucket wins) and deleted. That merge is idempotent, so
it needs no journal: a crash in the middle folds the file again next time. A
dead worker's last exemplars therefore stay on the exposition until newer ones
of the same buckets replace them, and its file does not pile up.

This module relies on promfork's value store (promfork.writer.values) taking the writer
lock. With prometheus-client's own value class no writer holds it, so the
Gunicorn hooks do not compact at all then (dead workers' files are kept, as
stock does).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from promfork.directory import fileformat, filenames, journal, locks, setup
from promfork.directory.locks import DirectoryLock
from promfork.writer import exemplars

log = logging.getLogger("promfork.master.compaction")

AGGREGATING_MODES = "livesum, sum, max, min or mostrecent"


def _step(name: str) -> None:
    """A named point between compaction steps (tests inject crashes here)."""


@dataclass
class CompactionResult:
    """What one compaction run did."""

    pids: list[int] = field(default_factory=list)
    files_removed: int = 0
    quarantined: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)  # files a live process holds: left alone
    dropped_all_gauges: set[str] = field(default_factory=set)  # names of mode-"all" gauges dropped


def fold(file: filenames.DbFile, into: fileformat.Entries, entries: fileformat.Entries) -> None:
    """Fold one dead file's entries into an archive's entries, as its kind and mode mean."""
    mode = file.mode
    for key, (value, ts) in entries.items():
        current = into.get(key)
        if current is None:
            into[key] = (value, ts if mode in ("max", "min", "mostrecent") else 0.0)
        elif mode == "max":
            if value > current[0]:  # as prometheus-client's merge: NaN never replaces
                into[key] = (value, ts)
        elif mode == "min":
            if value < current[0]:
                into[key] = (value, ts)
        elif mode == "mostrecent":
            if ts > current[1]:
                into[key] = (value, ts)
        else:  # counter, histogram, summary, gauge sum: see fileformat.add_exact
            into[key] = fileformat.add_exact(current, value)


def _metric_names(path: str) -> set[str]:
    try:
        return {json.loads(key)[0] for key in fileformat.read_entries(path)}
    except (OSError, ValueError, IndexError, TypeError):
        return set()


def _retire(directory: str, file: filenames.DbFile, result: CompactionResult) -> str | None:
    """Claim a dead process's file; delete it (live and ``all`` gauges) or retire it. None unless retired."""
    path = os.path.join(directory, file.name)
    fd = locks.claim(path)
    if fd is None:
        if os.path.exists(path):
            result.busy.append(file.name)
        return None
    try:
        if file.is_live_gauge or file.mode == "all":
            if file.mode == "all":
                result.dropped_all_gauges |= _metric_names(path)
            os.unlink(path)  # still holding the claim: nobody reopened it
            result.files_removed += 1
            return None
        retired = filenames.retired_name(file, os.fstat(fd).st_ino)
        os.rename(path, os.path.join(directory, retired))
        return retired
    finally:
        locks.release(fd)


def compact_dead_workers(directory: str, pids: Iterable[int]) -> CompactionResult:
    """Fold the files of the dead processes `pids` (and any retired file) into the archives.

    Caller holds the files lock exclusively. Raises OSError when the archives
    cannot be written (disk full); what was done so far is safe as it stands.
    """
    journal.recover(directory)
    _step("recovered")
    wanted = {str(pid) for pid in pids}
    result = CompactionResult()
    names = os.listdir(directory)
    folded = set()
    for file in filter(None, map(filenames.parse_name, names)):
        if file.owner in wanted and _retire(directory, file, result) is not None:
            folded.add(file.owner)
    _step("retired")
    retired = [f for f in map(filenames.parse_name, os.listdir(directory)) if f is not None and f.retired]
    archives: dict[str, fileformat.Entries] = {}
    delete: list[str] = []
    for file in retired:
        try:
            entries = fileformat.read_entries(os.path.join(directory, file.name))
        except fileformat.CorruptFile as exc:
            if setup.quarantine(directory, file.name, str(exc)):
                result.quarantined.append(file.name)
            continue
        archive = archives.get(file.prefix)
        if archive is None:
            archive = archives[file.prefix] = _read_archive(directory, file.prefix, result)
        fold(file, archive, entries)
        delete.append(file.name)
    renames = []
    try:
        for prefix, entries in archives.items():
            final = filenames.archive_name(prefix)
            fileformat.write_entries(os.path.join(directory, filenames.scratch_name(final)), entries)
            renames.append((filenames.scratch_name(final), final))
        _step("archives_written")
        if delete or renames:
            journal.write(directory, {"renames": renames, "delete": delete})
    except OSError:
        journal.recover(directory)  # drops the .new files; the retired files stay, read as they are
        raise
    _step("journal_committed")
    if delete or renames:
        journal.recover(directory)
        _step("done")
    result.pids = sorted(int(p) for p in folded)
    result.files_removed += len(delete)
    # After the values, which are committed by now: an exemplar archive that cannot be
    # written (a full disk) costs exemplars only; the dead workers' files stay to be read.
    try:
        result.files_removed += exemplars.fold_dead_workers(directory, (int(p) for p in wanted))
    except OSError as exc:
        log.error("promfork: dead workers' exemplars not folded (kept in place): %s", exc)
    return result


def _read_archive(directory: str, prefix: str, result: CompactionResult) -> fileformat.Entries:
    name = filenames.archive_name(prefix)
    try:
        return fileformat.read_entries(os.path.join(directory, name))
    except FileNotFoundError:
        return {}
    except fileformat.CorruptFile as exc:
        if setup.quarantine(directory, name, str(exc)):
            result.quarantined.append(name)
        return {}


def pids_with_files(directory: str) -> set[int]:
    """Every process that has metric files in `directory` (each is folded or dropped once it is dead)."""
    pids = set()
    for name in os.listdir(directory):
        parsed = filenames.parse_name(name)
        if parsed is not None and parsed.pid is not None:
            pids.add(parsed.pid)
        elif (pid := filenames.exemplar_file_pid(name)) is not None:
            pids.add(pid)
    return pids


def has_retired_files(directory: str) -> bool:
    """True when an interrupted run left retired files to fold."""
    return any((f := filenames.parse_name(name)) is not None and f.retired for name in os.listdir(directory))


def remove_live_gauges(directory: str, pid: int) -> int:
    """Delete the ``live*`` gauge files of the dead process `pid`, unless a live process holds them.

    prometheus-client's ``mark_process_dead``, made safe for pid reuse: a file
    whose pid already belongs to a new process (it holds the writer lock) stays.
    Returns how many files were deleted.
    """
    removed = 0
    for name in os.listdir(directory):
        file = filenames.parse_name(name)
        if file is None or not file.is_live_gauge or file.pid != pid:
            continue
        path = os.path.join(directory, name)
        fd = locks.claim(path)
        if fd is None:
            continue
        try:
            os.unlink(path)
            removed += 1
        finally:
            locks.release(fd)
    return removed


class Compactor:
    """Runs compaction in a background thread of the Gunicorn master.

    `worker_died` only records a pid and wakes the thread, so the master's loop is
    never blocked: the thread waits a bounded time for the files lock and, if a
    scrape (even a hung one) keeps it, retries later. Every `scan_interval` seconds it also looks
    for files of processes that died unseen (a master killed with -9, a worker
    Gunicorn never reported) and folds those. When a run cannot write (disk
    full), it calls `on_write_error`, logs (at most once a minute) and retries
    with a growing delay (up to `max_backoff` seconds) until it succeeds.
    """

    def __init__(
        self,
        directory: str,
        protected: Callable[[], set[int]],
        on_compacted: Callable[[CompactionResult], None] | None = None,
        scan_interval: float = 30.0,
        retry_delay: float = 0.05,
        lock_wait: float = 0.5,
        on_write_error: Callable[[OSError], None] | None = None,
        max_backoff: float = 2.0,
    ) -> None:
        self.directory = directory
        self.lock = DirectoryLock(directory)
        self._protected = protected
        self._on_compacted = on_compacted
        self._on_write_error = on_write_error
        self._scan_interval = scan_interval
        self._retry_delay = retry_delay
        self._lock_wait = lock_wait
        self._max_backoff = max_backoff
        self._pending: set[int] = set()
        self._sweep = True  # look for retired files left by an interrupted run
        self._mutex = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned_all_gauges: set[str] = set()
        self._failing_since: float | None = None
        self._logged_failure_at = 0.0

    def worker_died(self, pid: int) -> None:
        """Record that `pid` exited; its files are folded soon after. Safe to call from any thread."""
        with self._mutex:
            self._pending.add(pid)
        self._wake.set()

    def find_orphans(self) -> set[int]:
        """Pids with files whose process no longer exists and is not ours to keep."""
        protected = self._protected()
        return {pid for pid in pids_with_files(self.directory) if pid not in protected and not locks.is_alive(pid)}

    @property
    def has_work(self) -> bool:
        """True while pids are pending or retired files may be waiting."""
        return bool(self._pending) or self._sweep

    def run_once(self) -> CompactionResult | None:
        """Fold every pending pid once the lock is free; None (pids kept pending) if it stays busy.

        Raises OSError when the archives cannot be written; the pids stay pending.
        """
        with self._mutex:
            pids = set(self._pending)
        # Live workers' files would fail the claim anyway; not trying saves the syscalls.
        pids -= self._protected()
        with self.lock.try_exclusive(self._lock_wait) as locked:
            if not locked:
                return None
            result = compact_dead_workers(self.directory, pids)
        with self._mutex:
            self._pending -= pids | set(self._protected())
        self._sweep = False
        self._warn_about_all_gauges(result.dropped_all_gauges)
        if self._on_compacted is not None and (result.pids or result.quarantined):
            self._on_compacted(result)
        return result

    def _warn_about_all_gauges(self, names: set[str]) -> None:
        for name in sorted(names - self._warned_all_gauges):
            log.warning(
                "promfork: gauge %s uses multiprocess_mode='all' (prometheus-client's default): one series per "
                "worker pid. A dead worker's series is dropped when its files are folded; to aggregate across "
                "workers, create it with multiprocess_mode= %s",
                name,
                AGGREGATING_MODES,
            )
        self._warned_all_gauges |= names

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

    def _attempt(self) -> float | None:
        """One run; returns the delay before the next attempt, or None when nothing is left to do."""
        try:
            busy = self.run_once() is None
        except OSError as exc:
            self._write_failed(exc)
            elapsed = time.monotonic() - (self._failing_since or time.monotonic())
            return min(self._max_backoff, max(self._retry_delay, elapsed / 4))
        except Exception:  # keep the thread alive; the journal makes a retry safe
            log.exception("promfork: compaction failed; will retry")
            return self._max_backoff
        if busy:
            return self._retry_delay
        if self._failing_since is not None:
            log.warning("promfork: compaction writes again in %s; dead workers' files folded", self.directory)
            self._failing_since = None
        return None

    def _write_failed(self, exc: OSError) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if self._on_write_error is not None:
            self._on_write_error(exc)
        if now - self._logged_failure_at >= 60.0:
            log.error(
                "promfork: compaction cannot store the archive in %s: %s; dead workers' files are kept and "
                "read as they are (totals stay exact); retrying",
                self.directory,
                exc,
            )
            self._logged_failure_at = now

    def _loop(self) -> None:
        next_scan = 0.0
        while True:
            now = time.monotonic()
            if now >= next_scan:
                try:
                    for pid in self.find_orphans():
                        self.worker_died(pid)
                    self._sweep = self._sweep or has_retired_files(self.directory)
                except OSError as exc:
                    log.error("promfork: cannot scan %s for dead workers: %s", self.directory, exc)
                next_scan = now + self._scan_interval
            delay = self._attempt() if self.has_work else None
            if self._stop.is_set() and (delay is None or delay > self._retry_delay or not self.has_work):
                return
            self._wake.wait(delay if delay is not None else max(0.0, next_scan - time.monotonic()))
            self._wake.clear()
