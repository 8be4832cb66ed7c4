"""Where a worker's metric values live in multiprocess mode: a faster drop-in for prometheus-client's value class.

prometheus-client stores every counter, gauge and histogram value of a process
through one class, chosen when the library is first imported. Its multiprocess
class asks the kernel for the process id on every update (to notice a fork) and
goes through several calls before the 16 bytes reach the file; that is most of
the cost of an update, paid a dozen times per request. ``MmapValue`` keeps the
same files, keys and layout (``metrics.dbfiles.ValueFile``), so every reader,
the stock ``MultiProcessCollector`` included, sees no difference, and:

* learns about a fork from ``os.register_at_fork`` instead of a syscall per update;
* holds its file position, so an update is one add and one aligned 8-byte store;
* keeps one lock per process, as prometheus-client does: updates from threads
  (gthread workers) are never lost, and a fork never inherits it held.

Importing this module imports prometheus_client: do it only once
PROMETHEUS_MULTIPROC_DIR is set. ``install()`` puts MmapValue in place before
any metric exists. It declines once the stock class has created values in this
process: they would write the same files through a second, unaware writer.
"""

from __future__ import annotations

import os
import threading
from bisect import bisect_left

from metrics.dbfiles import ValueFile, parse_name


class _Process:
    """The value files of the current process; replaced in a forked child."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.files: dict[str, ValueFile] = {}
        self.lock = threading.Lock()

    def file(self, prefix: str) -> ValueFile:
        """This process's file for `prefix` (``counter``, ``gauge_livesum``...), opened on first use."""
        found = self.files.get(prefix)
        if found is None:
            directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
            if not directory:
                raise RuntimeError("PROMETHEUS_MULTIPROC_DIR is not set; metrics.values needs it in every process")
            found = self.files[prefix] = ValueFile(os.path.join(directory, f"{prefix}_{self.pid}.db"))
        return found


_process = _Process()


def _forked() -> None:
    # The child starts with its own files and lock. The parent's mappings are not
    # closed here: they are the child's copies and die with it.
    global _process
    _process = _Process()


os.register_at_fork(after_in_child=_forked)


class MmapValue:
    """One sample of one series, stored in this process's metric file (prometheus-client's value interface)."""

    _multiprocess = True
    __slots__ = ("_file", "_key", "_owner", "_prefix", "_slot", "_value")

    def __init__(
        self, typ, metric_name, name, labelnames, labelvalues, help_text, multiprocess_mode="", **_kwargs
    ) -> None:
        from prometheus_client.mmap_dict import mmap_key  # the key format is prometheus-client's own

        self._prefix = f"gauge_{multiprocess_mode}" if typ == "gauge" else typ
        self._key = mmap_key(metric_name, name, labelnames, labelvalues, help_text)
        with _process.lock:
            self._open(_process)

    def _open(self, process: _Process) -> None:
        """Find (or create) this sample in `process`'s file and load its stored value. Lock held."""
        self._owner = process
        self._file = process.file(self._prefix)
        self._slot = self._file.slot(self._key)
        self._value = self._file.doubles[self._slot]

    def inc(self, amount: float) -> None:
        """Add `amount` and store the new total."""
        process = _process
        with process.lock:
            if self._owner is not process:
                self._open(process)  # first use after a fork: this process's own file
            self._value = value = self._value + amount
            self._file.doubles[self._slot] = value

    def set(self, value: float, timestamp: float | None = None) -> None:
        """Store `value` (with `timestamp` for the mostrecent gauge modes)."""
        process = _process
        with process.lock:
            if self._owner is not process:
                self._open(process)
            self._value = value
            self._file.set(self._slot, value, timestamp or 0.0)

    def get(self) -> float:
        """The stored value."""
        process = _process
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
    counters take non-negative amounts only, as with ``inc``.
    """

    __slots__ = ("_direct", "_owner", "_public")

    def __init__(self, *children) -> None:
        self._public = tuple(child.observe if hasattr(child, "observe") else child.inc for child in children)
        self._direct = _direct_plan(children)
        self._owner = None

    @property
    def direct(self) -> bool:
        """True when updates go straight to MmapValue files, False when through the public API."""
        return self._direct is not None

    def update(self, *amounts: float) -> None:
        """Add each amount to its counter or gauge; observe it in its histogram."""
        # zip() with a keyword argument costs more than a write; one amount per child is the contract.
        direct = self._direct
        if direct is None:
            for record, amount in zip(self._public, amounts):  # noqa: B905
                record(amount)
            return
        process = _process
        lock = process.lock
        lock.acquire()  # cheaper than `with` by a third of an update; nothing below raises
        try:
            if self._owner is not process:
                self._adopt(process)
            # MmapValue.inc, inlined: this loop is most of what a request costs.
            for (total, bounds, buckets), amount in zip(direct, amounts):  # noqa: B905
                total._value = value = total._value + amount
                total._file.doubles[total._slot] = value
                if bounds is not None:
                    index = bisect_left(bounds, amount)
                    if amount <= bounds[index]:  # False for NaN, which no bucket counts
                        bucket = buckets[index]
                        bucket._value = value = bucket._value + 1.0
                        bucket._file.doubles[bucket._slot] = value
        finally:
            lock.release()

    def _adopt(self, process: _Process) -> None:
        """Point every value at `process`'s files (first update, or first after a fork). Lock held."""
        for total, _, buckets in self._direct:
            for value in (total, *buckets):
                if value._owner is not process:
                    value._open(process)
        self._owner = process


def _direct_plan(children) -> tuple | None:
    """Per child (total, upper bounds, buckets), or None when any child is not MmapValue-backed.

    The one place that knows how prometheus-client's Counter, Gauge and Histogram
    children hold their values; tests/test_values.py pins it to the installed version.
    """
    from prometheus_client import Counter, Gauge, Histogram

    plan = []
    for child in children:
        if isinstance(child, Counter | Gauge):
            total, bounds, buckets = getattr(child, "_value", None), None, ()
        elif isinstance(child, Histogram):
            total = getattr(child, "_sum", None)
            bounds = tuple(getattr(child, "_upper_bounds", ()))
            buckets = tuple(getattr(child, "_buckets", ()))
            if not bounds or len(bounds) != len(buckets) or bounds[-1] != float("inf"):
                return None
        else:
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
    set), which ``multiproc.ensure_multiprocess_mode`` reports as an error.
    Calling it again (a config reloaded on HUP) keeps it.
    """
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return False
    from prometheus_client import values

    if values.ValueClass is MmapValue:
        return True
    if not getattr(values.ValueClass, "_multiprocess", False) or _has_files(directory, os.getpid()):
        return False
    values.ValueClass = MmapValue
    return True


def _has_files(directory: str, pid: int) -> bool:
    try:
        names = os.listdir(directory)
    except OSError:
        return False
    return any((parsed := parse_name(name)) is not None and parsed.pid == pid for name in names)
