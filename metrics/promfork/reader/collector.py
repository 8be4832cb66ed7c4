"""The aggregating collector: one exposition from every worker's files and the archives.

It reads under the shared files lock (see promfork.directory.locks), so a concurrent
compaction never makes a scrape count a dead worker twice or not at all, and it
merges exactly (promfork.reader.merge), so totals never dip by a rounding error; what
it keeps between scrapes lives in promfork.reader.incremental. Damaged
files are skipped, counted in ``metrics_scrape_errors_total`` and set aside; the
scrape still answers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from promfork import forks
from promfork.config import Settings
from promfork.directory import filenames, journal, locks, setup
from promfork.directory.locks import DirectoryLock, LockTimeout
from promfork.forks import fork_guard
from promfork.reader.incremental import Encoder, IncrementalReader
from promfork.reader.process import WorkerProcessCollector
from promfork.writer import exemplars as exemplars_store

log = logging.getLogger("promfork.reader.collector")

MAX_CACHED_FORMATS = 8  # exposition formats whose lines are cached; others are formatted each scrape
_OPENMETRICS_1 = re.compile(r"version=1\.0\.[0-9]+")
_restart_lock = threading.Lock()  # guards replacing a reader after a fork; held for a constructor's time


def _new_restart_lock() -> None:
    global _restart_lock
    _restart_lock = threading.Lock()  # another thread may have held it at the fork


forks.after_fork_in_child(forks.SCRAPE_READER, _new_restart_lock)


class LibraryMetrics:
    """promfork's own counters about scrapes, compaction and storage (safe to update from any thread).

    One instance per process and namespace (``library_metrics``): two metric
    objects with the same name in one process would write one file slot from two
    separate in-memory totals.
    """

    def __init__(self, settings: Settings, registry=None) -> None:
        self.scrape_errors_name = settings.metric_name("metrics_scrape_errors")
        self.scrape_errors = Counter(
            settings.metric_name("metrics_scrape_errors_total"),
            "Metric files that could not be read during a scrape (set aside in quarantine/).",
            registry=registry,
        )
        self.compactions = Counter(
            settings.metric_name("metrics_compactions_total"),
            "Dead worker processes whose metric files were folded into the archive.",
            registry=registry,
        )
        self.write_errors = Counter(
            settings.metric_name("metrics_write_errors_total"),
            "Metric updates that could not be stored when made (disk full, damaged or busy file), and failed "
            "compaction runs. Updates are held in memory and stored when space returns; a process that exits "
            "before then loses them.",
            registry=registry,
        )

    def count_scrape_errors(self, n: int) -> None:
        """Count damaged files met by a scrape or a compaction."""
        with fork_guard:
            self.scrape_errors.inc(n)

    def count_compactions(self, n: int) -> None:
        """Count dead workers folded into the archive."""
        with fork_guard:
            self.compactions.inc(n)

    def count_write_errors(self, n: int) -> None:
        """Count writes that failed (a compaction run that could not store its archive)."""
        with fork_guard:
            self.write_errors.inc(n)


_library: dict[str, LibraryMetrics] = {}


def library_metrics(settings: Settings) -> LibraryMetrics:
    """This process's LibraryMetrics for the settings' namespace; the value store reports write errors to it."""
    found = _library.get(settings.namespace)
    if found is None:
        from promfork.writer import values

        found = _library[settings.namespace] = LibraryMetrics(settings)
        values.report_write_errors_to(found.write_errors)
    return found


class AggregatingCollector(Collector):
    """Collects every process's metrics from a multiprocess directory, exactly once.

    Holds a promfork.reader.incremental.IncrementalReader for its whole life, so a scrape
    costs what changed since the last one; ``render`` serves the exposition
    from the reader's cached lines, ``collect`` gives Metric objects to any
    other consumer. Safe to call from several threads (one reads at a time)
    and after a fork (the child starts a reader of its own).
    """

    def __init__(
        self,
        directory: str,
        library_metrics: LibraryMetrics,
        const_labels: Mapping[str, str] | None = None,
        lock_timeout: float = 5.0,
    ) -> None:
        self.directory = directory
        self.lock = DirectoryLock(directory)
        self.const_labels = dict(const_labels or {})
        self.lock_timeout = lock_timeout
        self._library = library_metrics
        self._start_reader()

    def _start_reader(self) -> None:
        self._mutex = threading.Lock()
        self.reader = IncrementalReader(self.directory, self.const_labels)
        self._formats: set[str] = set()
        self._pid = os.getpid()  # last: another thread that sees this pid sees the rest

    @contextlib.contextmanager
    def _reading(self) -> Iterator[IncrementalReader]:
        if self._pid != os.getpid():  # forked: the parent's lock may have been held at the fork
            with _restart_lock:
                if self._pid != os.getpid():
                    self._start_reader()
        mutex = self._mutex  # the one acquired is the one released
        if not mutex.acquire(timeout=self.lock_timeout):
            raise LockTimeout(f"another scrape of {self.directory} held the reader for {self.lock_timeout}s")
        try:
            yield self.reader
        except LockTimeout:
            raise  # nothing was read
        except BaseException:
            # A scrape that failed part way (an I/O error, a damaged key) may leave the
            # cache half updated: the next one starts from the files again.
            self.reader = IncrementalReader(self.directory, self.const_labels)
            raise
        finally:
            mutex.release()

    def collect(self) -> Iterable[Metric]:
        """Merge all files; raises LockTimeout if a compaction holds the lock too long."""
        with self._reading() as reader:
            extra, _ = self._refresh(reader)
            return reader.metrics(extra)

    def render(self, encoder: Encoder, fmt: str, names: Collection[str] | None = None, exemplars: bool = False) -> str:
        """The aggregated metrics formatted by `encoder` (no ``# EOF``), re-formatting only what changed.

        `fmt` is the format's content type (the cache key), `names` the
        ``name[]`` filter; with `exemplars` (OpenMetrics), bucket lines carry
        the exemplars of promfork.writer.exemplars. Raises LockTimeout as ``collect``.
        """
        # The content type comes from the client's Accept header: only a few are cached.
        fmt = _OPENMETRICS_1.sub("version=1.0.0", fmt)  # every 1.0.x formats alike
        with self._reading() as reader:
            if fmt not in self._formats:
                if len(self._formats) >= MAX_CACHED_FORMATS:
                    fmt = None
                else:
                    self._formats.add(fmt)
            extra, found = self._refresh(reader, exemplars)
            return reader.render(encoder, fmt, names, extra, found)

    def _refresh(self, reader: IncrementalReader, exemplars: bool = False) -> tuple[dict[str, float], dict | None]:
        """Bring the reader up to the directory (and read exemplars, if asked) under the shared lock.

        Damaged files are set aside; returns this scrape's own counts to add
        (see ``LibraryMetrics``) and the exemplars.
        """
        if journal.needs_recovery(self.directory):
            with self.lock.hold(exclusive=True, timeout=self.lock_timeout):
                journal.recover(self.directory)
        with self.lock.hold(exclusive=False, timeout=self.lock_timeout):
            damaged = self._read(reader)
            found = exemplars_store.read_exemplars(self.directory) if exemplars else None
        if not damaged:
            return {}, found
        self._set_aside(damaged)
        # The files were read before the counter moved: show this scrape's finds now.
        return {self._library.scrape_errors_name: len(damaged)}, found

    def _read(self, reader: IncrementalReader) -> list[str]:
        names = sorted(n for n in os.listdir(self.directory) if filenames.is_value_file(n))
        foreign = [n for n in names if filenames.parse_name(n) is None]
        unreadable = reader.update(n for n in names if n not in foreign)
        damaged = [n for n in unreadable if not self._still_being_created(n, os.path.join(self.directory, n))]
        return foreign + damaged

    @staticmethod
    def _still_being_created(name: str, path: str) -> bool:
        # prometheus-client creates a file empty, sizes it, then writes its header:
        # a live process's new file can be seen headerless for an instant. Not damage.
        pid = filenames.parse_name(name).pid
        if pid is None or not locks.is_alive(pid):
            return False
        try:
            with open(path, "rb") as src:
                header = src.read(4)
        except FileNotFoundError:
            return True
        return len(header) < 4 or header == b"\0\0\0\0"

    def _set_aside(self, names: list[str]) -> None:
        self._library.count_scrape_errors(len(names))
        with self.lock.try_exclusive(wait=0.5) as locked:
            if not locked:
                log.error("promfork: damaged metric files skipped this scrape: %s", ", ".join(names))
                return
            for name in names:
                # A process that has the file open for writing holds a shared lock on it:
                # never move a file someone still writes (it would write on, unseen).
                try:
                    claim = locks.claim(os.path.join(self.directory, name))
                except OSError:  # not even openable for writing: left where it is
                    claim = None
                if claim is None:
                    log.error("promfork: metric file %s unreadable this scrape; left in place (in use)", name)
                    continue
                try:
                    setup.quarantine(self.directory, name, "unreadable during scrape")
                finally:
                    locks.release(claim)


class ExpositionRegistry(CollectorRegistry):
    """The registry behind /metrics: the aggregating collector, served from its cached lines, and the rest.

    ``collect()`` and prometheus-client's encoders work on it as on any
    registry. ``exposition`` is what promfork.reader.exposition serves: the
    aggregated families from the reader's cache, then whatever else is
    registered (per-worker process metrics) formatted by prometheus-client.
    """

    def __init__(self, aggregating: AggregatingCollector) -> None:
        # Our collectors have no describe(): without the flag, ?name[]= filtering would answer nothing.
        super().__init__(auto_describe=False, support_collectors_without_names=True)
        self.aggregating = aggregating
        self._rest = CollectorRegistry(auto_describe=False, support_collectors_without_names=True)
        super().register(aggregating)

    def register(self, collector: Collector) -> None:
        """Register `collector` beside the aggregated metrics."""
        super().register(collector)
        self._rest.register(collector)

    def unregister(self, collector: Collector) -> None:
        """Remove a collector registered with ``register``."""
        super().unregister(collector)
        self._rest.unregister(collector)

    def exposition(self, accept: str | None, names: Collection[str] | None = None) -> tuple[bytes, str]:
        """The body and content type answering a scrape with this ``Accept`` header and ``name[]`` filter."""
        encoder, content_type = choose_encoder(accept)
        openmetrics = content_type.startswith("application/openmetrics-text")
        aggregated = self.aggregating.render(encoder, content_type, names, exemplars=openmetrics)
        rest = self._rest if names is None else self._rest.restricted_registry(names)
        return aggregated.encode("utf-8") + encoder(rest), content_type


def exposition_registry(settings: Settings) -> ExpositionRegistry:
    """A registry that aggregates every process's metrics from the multiprocess directory.

    Built per process and never the default registry, so nothing a worker
    registers by accident leaks into (or doubles) the aggregated exposition.
    """
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    registry = ExpositionRegistry(AggregatingCollector(directory, library_metrics(settings), settings.const_labels))
    registry.register(WorkerProcessCollector(directory, settings.namespace, settings.const_labels))
    return registry
