"""Where a worker's metric values live in multiprocess mode: a faster drop-in for prometheus-client's value class.

prometheus-client stores every counter, gauge and histogram value of a process
through one class, chosen when the library is first imported. Its multiprocess
class asks the kernel for the process id on every update (to notice a fork) and
goes through several calls before the 16 bytes reach the file; that is most of
the cost of an update, paid a dozen times per request. ``MmapValue`` keeps the
same files, keys and layout (``promfork.directory.fileformat.ValueFile``), so every reader,
the stock ``MultiProcessCollector`` included, sees no difference, and:

* learns about a fork from ``os.register_at_fork`` instead of a syscall per update;
* holds its file position, so an update is one add and one aligned 8-byte store;
* keeps one lock per process, as prometheus-client does: updates from threads
  (gthread workers) are never lost, and a fork never inherits it held;
* never fails the caller. When a value cannot be stored (the disk is full, the
  file is damaged or held by compaction), it is kept in memory and counted in
  the write-errors counter (``report_write_errors_to``); a line is logged at
  most once a minute per process; updates (and, in an idle process, a small
  thread that lives only while something is held) retry at most once a second,
  and once storage works again every value held in memory is written, so a
  process that lives through the fault loses nothing. A stock value would die
  with SIGBUS instead (its file pages are not allocated ahead).

Importing this module imports prometheus_client: do it only once
PROMETHEUS_MULTIPROC_DIR is set. ``install()`` puts MmapValue in place before
any metric exists. It declines once the stock class has created values in this
process: they would write the same files through a second, unaware writer.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
import threading
import time
import weakref
from bisect import bisect_left

from promfork import client, forks
from promfork.directory import filenames, setup
from promfork.directory.fileformat import CorruptFile, ValueFile
from promfork.writer.outage import RETRY_INTERVAL, Outage
from promfork.writer.unrolled import compile_update

log = logging.getLogger("promfork.writer.values")


class _Process:
    """The value files of one process (the current one; a forked child makes its own)."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = os.getpid() if pid is None else pid
        self.files: dict[str, ValueFile] = {}
        self.lock = threading.Lock()
        self.unstored: set[MmapValue] = set()  # values held in memory only, until storage works again
        self.outage = Outage("metric values", "held in memory", self.pid)
        self.retrying = False  # a thread is storing what is held
        # Replaced whenever a file of this process is remapped or a value moves: update
        # functions (promfork.writer.unrolled) holding views and slots from before then take the slow path.
        self.layout = object()

    def file(self, prefix: str) -> ValueFile:
        """This process's file for `prefix` (``counter``, ``gauge_livesum``...), opened on first use.

        Raises OSError when it cannot be created (full disk, held by compaction).
        A damaged file is set aside and replaced by a new one.
        """
        found = self.files.get(prefix)
        if found is None:
            directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
            if not directory:
                raise RuntimeError(
                    "PROMETHEUS_MULTIPROC_DIR is not set; promfork's value store needs it in every process"
                )
            name = filenames.value_file_name(prefix, self.pid)
            try:
                found = ValueFile(os.path.join(directory, name))
            except CorruptFile as exc:
                setup.quarantine(directory, name, str(exc))
                found = ValueFile(os.path.join(directory, name))
            self.files[prefix] = found
        return found

    def place(self, prefix: str, key: str) -> tuple[ValueFile, int]:
        """The file and slot of `key` (created if new); raises as ``file`` and ``ValueFile.slot`` do. Lock held."""
        file = self.file(prefix)
        view = file.doubles
        slot = file.slot(key)
        if file.doubles is not view:  # the file grew and was mapped anew: earlier views are released
            self.layout = object()
        return file, slot

    def close(self) -> None:
        """Unmap and close every file (their locks go with them)."""
        for file in self.files.values():
            with contextlib.suppress(Exception):
                file.close()
        self.files.clear()

    def held_in_memory(self, count: int, error: BaseException | None = None) -> None:
        """Note `count` updates that could not be stored; count them, log (rate-limited) and retry. Lock held."""
        counter = _write_errors
        if counter is not None:
            _add(counter, float(count), self)
        self.outage.failed(count, error)
        self.retry_soon()
        if self.unstored and not self.retrying:
            # An idle process gets no updates to retry on: this thread stores what it holds.
            # Not threading.Thread: its start() waits for the thread, and under gevent that
            # switches greenlets while this (real, made-at-fork) lock is held.
            try:
                _thread.start_new_thread(self._retry_until_stored, ())
            except RuntimeError:  # no threads left (a pids limit), or the interpreter is exiting
                return
            self.retrying = True

    def _retry_until_stored(self) -> None:
        while True:
            time.sleep(RETRY_INTERVAL)
            with self.lock:
                if _current.process is not self:
                    return  # forked: this is the parent's state, not ours
                self.retry_soon()
                if not self.unstored:
                    self.retrying = False
                    return

    def retry_soon(self) -> None:
        """Try to store the values held in memory, unless the last attempt was under a second ago. Lock held."""
        if self.outage.retry_due():
            self.store_again()

    def store_again(self) -> None:
        """Try to write every value held in memory to its file. Lock held."""
        for value in list(self.unstored):
            with contextlib.suppress(Exception):  # still failing: try again later; the others may work
                value._store_held(self)
                self.unstored.discard(value)
        if self.unstored:
            return
        self.outage.recovered()


class _Current:
    """Which ``_Process`` is this process's: replaced in a forked child (update functions hold this)."""

    __slots__ = ("process",)

    def __init__(self, process: _Process) -> None:
        self.process = process


_current = _Current(_Process())
# Every MmapValue by (class, file prefix, sample key): one object per series (see MmapValue).
_series: weakref.WeakValueDictionary[tuple, MmapValue] = weakref.WeakValueDictionary()
_write_errors: MmapValue | None = None  # the metrics_write_errors_total value, once registered


def _forked() -> None:
    # The child starts with its own files and lock. Its copies of the parent's
    # mappings are closed: they would hold the parent's file locks for as long as
    # the child lives, keeping compaction away from them after the parent dies.
    inherited = _current.process
    _current.process = _Process()
    inherited.close()


forks.after_fork_in_child(forks.VALUE_STORE, _forked)


def report_write_errors_to(counter) -> None:
    """Count updates that could not be stored in `counter` (a Counter without labels, stored by MmapValue)."""
    global _write_errors
    value = getattr(counter, "_value", None)
    _write_errors = value if type(value) is MmapValue else None


def count_write_errors(count: int) -> None:
    """Count `count` updates of another store (exemplars) that could not be stored, in the write-errors counter.

    Call it without holding this module's lock (it takes it).
    """
    counter = _write_errors
    if counter is not None:
        counter.inc(float(count))


def _add(value: MmapValue, amount: float, process: _Process) -> bool:
    """Add `amount` to `value` in `process`; True when stored, False when held in memory. Lock held."""
    if value._owner is not process:
        value._open(process)
    value._value = total = value._value + amount
    file = value._file
    if file is None:
        return False
    file.doubles[value._slot] = total
    return True


class MmapValue:
    """One sample of one series, stored in this process's metric file (prometheus-client's value interface).

    One object per series: constructing a value for a series this process already
    has returns the existing object, so however many metric objects hold the
    series (two apps in one worker, an app factory called twice, a metric
    declared twice), they update one in-memory total and each update counts
    once. prometheus-client's own value class keeps one total per metric object
    instead, and the last writer wins.
    """

    _multiprocess = True
    __slots__ = ("__weakref__", "_file", "_key", "_owner", "_prefix", "_relative", "_slot", "_timestamp", "_value")

    def __new__(cls, typ, metric_name, name, labelnames, labelvalues, help_text, multiprocess_mode="", **_kwargs):
        prefix = f"gauge_{multiprocess_mode}" if typ == "gauge" else typ
        key = client.sample_key(metric_name, name, labelnames, labelvalues, help_text)
        with _current.process.lock:
            found = _series.get((cls, prefix, key))
            if found is None:
                found = _series[(cls, prefix, key)] = object.__new__(cls)
                found._prefix, found._key, found._owner, found._file = prefix, key, None, None
                found._timestamp, found._relative, found._value, found._slot = 0.0, False, 0.0, -1
        return found

    def __init__(self, *_args, **_kwargs) -> None:
        """Open the series in this process's file, unless this object was made for it already."""
        process = _current.process
        with process.lock:
            if self._owner is None:
                self._open(process)

    def _open(self, process: _Process) -> None:
        """Find (or create) this sample in `process`'s file and load its stored value. Lock held.

        When the file cannot be used the value starts at 0 in memory (see the module docstring).
        """
        try:
            file, slot = process.place(self._prefix, self._key)
        except Exception as exc:  # OSError mostly; never fail the caller's request
            # The stored value is unknown: what is held counts from 0 and is added to it later.
            self._file, self._slot, self._value, self._relative = None, -1, 0.0, True
            self._owner = process
            process.unstored.add(self)
            process.held_in_memory(0, exc)
            return
        self._file, self._slot, self._value, self._relative = file, slot, file.doubles[slot], False
        self._owner = process  # last: an interrupted open leaves the value to be opened again

    def _store_held(self, process: _Process) -> None:
        """Write the value held in memory to its file; raises while that is still impossible. Lock held."""
        file, slot = process.place(self._prefix, self._key)
        process.layout = object()  # this value now lives in a file
        if self._relative:  # increments on top of a value never read (a continued file): add them
            self._value += file.doubles[slot]
        file.set(slot, self._value, self._timestamp)
        self._file, self._slot, self._relative = file, slot, False

    def inc(self, amount: float) -> None:
        """Add `amount` and store the new total."""
        process = _current.process
        with process.lock:
            file = self._file
            if self._owner is process and file is not None:  # the usual case, inlined
                self._value = value = self._value + amount
                file.doubles[self._slot] = value
                if process.unstored:
                    process.retry_soon()
            elif not _add(self, amount, process):
                process.held_in_memory(1)

    def set(self, value: float, timestamp: float | None = None) -> None:
        """Store `value` (with `timestamp` for the mostrecent gauge modes)."""
        process = _current.process
        with process.lock:
            if self._owner is not process:
                self._open(process)
            self._value = value
            self._timestamp = timestamp or 0.0
            self._relative = False  # an absolute value now
            if self._file is None:
                process.held_in_memory(1)
                return
            self._file.set(self._slot, value, self._timestamp)
            if process.unstored:
                process.retry_soon()

    def get(self) -> float:
        """The current value (stored, or held in memory)."""
        process = _current.process
        with process.lock:
            if self._owner is not process:
                self._open(process)
            return self._value

    def set_exemplar(self, exemplar) -> None:
        """Exemplars are not kept in multiprocess mode (as in prometheus-client)."""

    def get_exemplar(self) -> None:
        """Exemplars are not kept in multiprocess mode."""
        return None


class Samples:
    """Labelled children of counters, gauges and histograms that are updated together, as one request's.

    ``Samples(requests, duration).update(1, 0.25)`` is ``requests.inc(1)`` and
    ``duration.observe(0.25)``, written under one lock in one pass when the values
    live in MmapValue, through the public API otherwise. Amounts are not checked:
    counters take non-negative amounts only, as with ``inc``; one amount per child.

    ``update`` is made for this plan's shape by ``promfork.writer.unrolled`` (the loop
    below, unrolled: most of what a request costs is here), for the files and
    slots its values have in this process. The loop in ``_update_slow`` is the
    reference and serves first use, forks, remapped files and values held in
    memory; it makes ``update`` again once every value is stored.
    """

    __slots__ = ("_direct", "_owner", "_public", "_reference_only", "update")

    def __init__(self, *children) -> None:
        self._public = tuple(child.observe if hasattr(child, "observe") else child.inc for child in children)
        self._direct = _direct_plan(children)
        self._owner = None
        self._reference_only = False
        if self._direct is None:
            self.update = self._update_public
        else:  # slow until first used in a process; then made again for its files (_update_slow)
            self._make_update(None)

    def _make_update(self, layout: object) -> None:
        """Make ``update`` for the current files; if that fails, the reference loop serves from now on."""
        if self._reference_only:
            return
        try:
            self.update = compile_update(self, self._direct, _current, layout)
        except Exception as exc:  # a bound Python cannot compare as a literal (NaN): never fail the caller
            self._reference_only = True
            self.update = self._update_reference
            log.warning("promfork: updates of %d values use the reference loop: %s", len(self._direct), exc)

    def _update_reference(self, *amounts: float) -> None:
        process = _current.process
        with process.lock:
            self._update_slow(process, amounts)

    @property
    def direct(self) -> bool:
        """True when updates go straight to MmapValue files, False when through the public API."""
        return self._direct is not None

    def _update_public(self, *amounts: float) -> None:
        for record, amount in zip(self._public, amounts):  # noqa: B905
            record(amount)

    def _update_slow(self, process: _Process, amounts: tuple[float, ...]) -> None:
        """``update`` on first use, after a fork, or while values are held in memory. Lock held."""
        if self._owner is not process:
            self._adopt(process)
        if process.unstored:
            self._update_held(process, amounts)
            return
        for (total, bounds, buckets), amount in zip(self._direct, amounts):  # noqa: B905
            total._value = value = total._value + amount
            total._file.doubles[total._slot] = value
            if bounds is not None:
                index = bisect_left(bounds, amount)
                if amount <= bounds[index]:  # False for NaN, which no bucket counts
                    bucket = buckets[index]
                    bucket._value = value = bucket._value + 1.0
                    bucket._file.doubles[bucket._slot] = value
        # Every value is in a file of this process now: the fast path, for these views and slots.
        self._make_update(process.layout)

    def _update_held(self, process: _Process, amounts: tuple[float, ...]) -> None:
        """``update`` while some values of this process cannot be stored. Lock held."""
        unstored = 0
        for (total, bounds, buckets), amount in zip(self._direct, amounts):  # noqa: B905
            unstored += not _add(total, amount, process)
            if bounds is not None:
                index = bisect_left(bounds, amount)
                if amount <= bounds[index]:
                    unstored += not _add(buckets[index], 1.0, process)
        if unstored:
            process.held_in_memory(unstored)
        else:
            process.retry_soon()

    def _adopt(self, process: _Process) -> None:
        """Point every value at `process`'s files (first update, or first after a fork). Lock held."""
        for total, _, buckets in self._direct:
            for value in (total, *buckets):
                if value._owner is not process:
                    value._open(process)
        self._owner = process


def _direct_plan(children) -> tuple | None:
    """Per child (total, upper bounds, buckets), or None when any child is not MmapValue-backed."""
    plan = []
    for child in children:
        found = client.values_of(child)
        if found is None:
            return None
        total, bounds, buckets = found
        if bounds is not None:
            if not bounds or len(bounds) != len(buckets) or bounds[-1] != float("inf"):
                return None
            if any(bound != bound for bound in bounds):  # NaN: only observe()'s own scan counts as stock does
                return None
        if not all(type(value) is MmapValue for value in (total, *buckets)):
            return None
        plan.append((total, bounds, buckets))
    return tuple(plan)


def install() -> bool:
    """Make MmapValue prometheus-client's value class; False if the stock class must stay.

    Call it once PROMETHEUS_MULTIPROC_DIR is set, before metrics are created.
    It declines when this process already has stock values (their files exist):
    two unaware writers must never share a file. It also declines when
    prometheus_client is in in-memory mode (imported before the variable was
    set), which ``client.ensure_multiprocess_mode`` reports as an error, and on a
    prometheus-client outside the tested range (``client.supported``).
    Calling it again (a config reloaded on HUP) keeps it.
    """
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return False
    current = client.value_class()
    if current is MmapValue:
        return True
    if not client.supported():
        log.warning(
            "promfork: prometheus-client %s is outside the tested range %s; keeping its own value class",
            ".".join(map(str, client.installed_version())),
            client.TESTED,
        )
        return False
    if not getattr(current, "_multiprocess", False) or _has_files(directory, os.getpid()):
        return False
    client.use_value_class(MmapValue)
    return True


def _has_files(directory: str, pid: int) -> bool:
    try:
        found = os.listdir(directory)
    except OSError:
        return False
    return any((parsed := filenames.parse_name(name)) is not None and parsed.pid == pid for name in found)
