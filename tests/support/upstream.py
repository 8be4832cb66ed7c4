"""Runs prometheus-client's own multiprocess tests with promfork's value store, reader and compaction.

tests/test_upstream_multiprocess.py fetches ``tests/test_multiprocess.py`` from the
source distribution of the installed prometheus-client; ``load_upstream`` imports
it and replaces, in that module only, the names through which it reaches
stock's multiprocess machinery:

* ``MultiProcessValue(process_identifier)``: a class of promfork's ``MmapValue``
  that stores as the (fake) process ``process_identifier()`` names;
* ``get_value_class()``: that class for this process once PROMETHEUS_MULTIPROC_DIR
  is set, as ``promfork.writer.values.install()`` decides;
* ``MultiProcessCollector``: stock's constructor contract, collecting through
  promfork's ``AggregatingCollector`` and merging through ``promfork.reader.merge``;
* ``mark_process_dead``: promfork's compaction of the dead pid.

Upstream simulates processes inside one interpreter, by pid. Here each fake pid
has its own ``promfork.writer.values._Process`` (its files and their writer locks), all
open at once as live processes' would be; MmapValue follows a change of
``promfork.writer.values._current.process`` as it follows a fork. A process marked dead closes
its files first: a dead process holds no locks, and compaction folds only
unlocked files.

``TestMmapedDict`` runs unchanged: it tests prometheus-client's ``MmapedDict``,
whose reader promfork reads every file with (``promfork.directory.fileformat.read_entries``).
Cases that cannot pass against promfork are in ``NOT_APPLICABLE``, with why.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import unittest
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

from prometheus_client import CollectorRegistry
from prometheus_client import values as stock_values
from prometheus_client.multiprocess import MultiProcessCollector as StockCollector

from promfork.config import Settings, load_settings
from promfork.directory.locks import DirectoryLock
from promfork.master import compaction
from promfork.reader.collector import AggregatingCollector, LibraryMetrics
from promfork.reader.merge import merge_files
from promfork.writer import values

NOT_APPLICABLE: dict[str, str] = {
    "TestMultiProcess.test_gauge_all": (
        "promfork drops a dead process's multiprocess_mode='all' gauge series when it compacts the process "
        "(kept, they would add a series for every worker that ever lived; see promfork/master/compaction.py), so "
        "pid 123's series is gone after mark_process_dead(123)"
    ),
    "TestMultiProcessDeprecation.test_deprecation_warning": (
        "promfork honours the lowercase prometheus_multiproc_dir once, at start: prepare_environment() reads it "
        "through config.load_settings (which logs the deprecation instead of issuing a DeprecationWarning) and "
        "exports PROMETHEUS_MULTIPROC_DIR for every process; a collector constructor neither exports nor warns"
    ),
}

_REPLACED = ("MultiProcessValue", "get_value_class", "MultiProcessCollector", "mark_process_dead")
_ENVIRONMENT = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")
_processes: dict[int, values._Process] = {}  # fake pid -> its files, while a case runs


def _run_as(pid: int) -> None:
    process = _processes.get(pid)
    if process is None:
        process = _processes[pid] = values._Process(pid=pid)
    values._current.process = process


def MultiProcessValue(process_identifier: Callable[[], int] = os.getpid) -> type:
    """A value class that stores through promfork's MmapValue as the process `process_identifier()` names."""

    class FakeProcessValue(values.MmapValue):
        __slots__ = ()

        def __init__(self, *args, **kwargs) -> None:
            _run_as(process_identifier())
            super().__init__(*args, **kwargs)

        def inc(self, amount: float) -> None:
            _run_as(process_identifier())
            super().inc(amount)

        def set(self, value: float, timestamp: float | None = None) -> None:
            _run_as(process_identifier())
            super().set(value, timestamp)

        def get(self) -> float:
            _run_as(process_identifier())
            return super().get()

    return FakeProcessValue


def get_value_class() -> type:
    """promfork's value class for this process once PROMETHEUS_MULTIPROC_DIR is set, in-memory values otherwise."""
    return MultiProcessValue() if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else stock_values.MutexValue


@functools.cache
def _library_metrics() -> LibraryMetrics:
    # promfork's own counters, kept in memory: in a file they would be series of whichever fake process is current.
    chosen, stock_values.ValueClass = stock_values.ValueClass, stock_values.MutexValue
    try:
        return LibraryMetrics(Settings(), registry=CollectorRegistry())
    finally:
        stock_values.ValueClass = chosen


class MultiProcessCollector:
    """Stock's collector contract, collecting through promfork's AggregatingCollector."""

    def __init__(self, registry, path: str | None = None) -> None:
        if path is None:
            path = load_settings().multiproc_dir
        if not path or not os.path.isdir(path):
            raise ValueError("env PROMETHEUS_MULTIPROC_DIR is not set or not a directory")
        self._aggregating = AggregatingCollector(path, _library_metrics())
        if registry:
            registry.register(self)

    def collect(self):
        """Every process's metrics, read under the files lock and merged exactly."""
        return self._aggregating.collect()

    @staticmethod
    def merge(files, accumulate=True):
        """Merge `files` as promfork's scrape does; raises RuntimeError on a damaged file, as stock's reader does."""
        if not accumulate:
            # Stock's non-cumulative merge exists to write merged values back to files, which promfork never does:
            # it has no such merge. This keeps the case's other half, stock reading the files MmapValue wrote.
            return StockCollector.merge(files, accumulate=False)
        metrics, damaged = merge_files(files)
        if damaged:
            raise RuntimeError(f"damaged metric files: {', '.join(damaged)}")
        return metrics


def mark_process_dead(pid: int, path: str | None = None) -> None:
    """Fold the dead process's files into the archives and drop its live and ``all`` gauges, as promfork does."""
    if path is None:
        path = load_settings().multiproc_dir
    dead = _processes.pop(pid, None)
    if dead is not None:
        dead.close()  # a dead process holds no locks
    with DirectoryLock(path).try_exclusive(wait=5.0) as locked:
        if not locked:
            raise RuntimeError(f"the files lock of {path} stayed busy for 5s; pid {pid} was not compacted")
        compaction.compact_dead_workers(path, [pid])


def load_upstream(path: Path) -> ModuleType:
    """Import upstream's test_multiprocess.py from `path`, wired to promfork instead of stock."""
    spec = importlib.util.spec_from_file_location("upstream_test_multiprocess", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = [name for name in _REPLACED if name not in vars(module)]
    if missing:
        raise RuntimeError(f"{path} no longer imports {', '.join(missing)}: update tests/support/upstream.py")
    for name in _REPLACED:
        setattr(module, name, globals()[name])
    return module


def upstream_cases(module: ModuleType) -> dict[str, tuple[type[unittest.TestCase], str]]:
    """Every test of the upstream module, by id ``Class.method``: its class and method name."""
    cases = {}
    for suite in unittest.defaultTestLoader.loadTestsFromModule(module):
        for case in suite:
            method = case.id().rpartition(".")[2]
            cases[f"{type(case).__name__}.{method}"] = (type(case), method)
    return cases


@contextlib.contextmanager
def _fake_processes() -> Iterator[None]:
    saved = (stock_values.ValueClass, values._current.process, {name: os.environ.get(name) for name in _ENVIRONMENT})
    try:
        yield
    finally:
        for process in _processes.values():
            process.close()
        _processes.clear()
        stock_values.ValueClass, values._current.process, environment = saved
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_case(case: tuple[type[unittest.TestCase], str]) -> unittest.TestResult:
    """Run one upstream case with unittest; afterwards every value class, process and variable is as before."""
    test_class, method = case
    result = unittest.TestResult()
    with _fake_processes():
        test_class(method).run(result)
    return result
