"""The aggregating collector: one exposition from every worker's files and the archives.

It reads under the shared files lock (see promfork.multiproc), so a concurrent
compaction never makes a scrape count a dead worker twice or not at all, and it
merges exactly (promfork.merge), so totals never dip by a rounding error. Damaged
files are skipped, counted in ``metrics_scrape_errors_total`` and set aside; the
scrape still answers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from promfork import compaction, dbfiles
from promfork.compaction import is_alive
from promfork.config import Settings
from promfork.merge import merge_files
from promfork.multiproc import DirectoryLock, fork_guard
from promfork.process import WorkerProcessCollector

log = logging.getLogger("promfork.collector")


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
        from promfork import values

        found = _library[settings.namespace] = LibraryMetrics(settings)
        values.report_write_errors_to(found.write_errors)
    return found


class AggregatingCollector(Collector):
    """Collects every process's metrics from a multiprocess directory, exactly once."""

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

    def collect(self) -> Iterable[Metric]:
        """Merge all files; raises multiproc.LockTimeout if a compaction holds the lock too long."""
        if compaction.needs_recovery(self.directory):
            with self.lock.hold(exclusive=True, timeout=self.lock_timeout):
                compaction.recover(self.directory)
        with self.lock.hold(exclusive=False, timeout=self.lock_timeout):
            metrics, damaged = self._read()
        if damaged:
            self._set_aside(damaged)
            # The files were read before the counter moved: show this scrape's finds now.
            for metric in metrics:
                if metric.name == self._library.scrape_errors_name:
                    metric.samples = [s._replace(value=s.value + len(damaged)) for s in metric.samples]
        if self.const_labels:
            for metric in metrics:
                metric.samples = [s._replace(labels={**s.labels, **self.const_labels}) for s in metric.samples]
        return metrics

    def _read(self) -> tuple[list[Metric], list[str]]:
        names = sorted(n for n in os.listdir(self.directory) if n.endswith(".db"))
        foreign = [n for n in names if dbfiles.parse_name(n) is None]
        paths = [os.path.join(self.directory, n) for n in names if n not in foreign]
        metrics, unreadable = merge_files(paths)
        damaged = [n for n in unreadable if not self._still_being_created(n, os.path.join(self.directory, n))]
        return metrics, foreign + damaged

    @staticmethod
    def _still_being_created(name: str, path: str) -> bool:
        # prometheus-client creates a file empty, sizes it, then writes its header:
        # a live process's new file can be seen headerless for an instant. Not damage.
        pid = dbfiles.parse_name(name).pid
        if pid is None or not is_alive(pid):
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
                compaction.quarantine(self.directory, name, "unreadable during scrape")


def exposition_registry(settings: Settings) -> CollectorRegistry:
    """A registry that aggregates every process's metrics from the multiprocess directory.

    Built per process and never the default registry, so nothing a worker
    registers by accident leaks into (or doubles) the aggregated exposition.
    """
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    # Our collectors have no describe(): without the flag, ?name[]= filtering would answer nothing.
    registry = CollectorRegistry(auto_describe=False, support_collectors_without_names=True)
    registry.register(AggregatingCollector(directory, library_metrics(settings), settings.const_labels))
    registry.register(WorkerProcessCollector(directory, settings.namespace, settings.const_labels))
    return registry
