"""The aggregating collector: one exposition from every worker's files and the archives.

It reads under the shared files lock (see metrics.multiproc), so a concurrent
compaction never makes a scrape count a dead worker twice or not at all, and it
merges with prometheus-client's own ``MultiProcessCollector.merge``. Damaged
files are skipped, counted in ``metrics_scrape_errors_total`` and set aside; the
scrape still answers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from metrics import compaction, dbfiles
from metrics.compaction import is_alive
from metrics.config import Settings
from metrics.multiproc import DirectoryLock

log = logging.getLogger("promfork.collector")


class LibraryMetrics:
    """promfork's own counters about scrapes and compaction."""

    def __init__(self, settings: Settings, registry=None) -> None:
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
        if self.const_labels:
            for metric in metrics:
                metric.samples = [s._replace(labels={**s.labels, **self.const_labels}) for s in metric.samples]
        return metrics

    def _read(self) -> tuple[list[Metric], list[str]]:
        names = [n for n in os.listdir(self.directory) if n.endswith(".db")]
        known = [n for n in names if dbfiles.parse_name(n) is not None]
        damaged = [n for n in names if dbfiles.parse_name(n) is None]
        paths = [os.path.join(self.directory, n) for n in known]
        try:
            return list(MultiProcessCollector.merge(paths)), damaged
        except Exception as exc:  # damaged files: check them one by one; the fast path stays cheap
            log.debug("promfork: merge failed (%s); checking files one by one", exc)
        good = []
        for name, path in zip(known, paths, strict=True):
            try:
                dbfiles.check_entries(path)
                good.append(path)
            except FileNotFoundError:
                continue
            except dbfiles.CorruptFile:
                if not self._still_being_created(name, path):
                    damaged.append(name)
        return list(MultiProcessCollector.merge(good)), damaged

    @staticmethod
    def _still_being_created(name: str, path: str) -> bool:
        # prometheus-client creates a file empty, then grows it: a live process's
        # file can be seen at size 0 for an instant. That is not damage.
        pid = dbfiles.parse_name(name).pid
        try:
            empty = os.path.getsize(path) < 8
        except OSError:
            return True
        return empty and pid is not None and is_alive(pid)

    def _set_aside(self, names: list[str]) -> None:
        self._library.scrape_errors.inc(len(names))
        with self.lock.try_exclusive() as locked:
            if not locked:
                log.error("promfork: damaged metric files skipped this scrape: %s", ", ".join(names))
                return
            for name in names:
                try:
                    compaction.quarantine(self.directory, name, "unreadable during scrape")
                except FileNotFoundError:
                    continue


def exposition_registry(settings: Settings) -> CollectorRegistry:
    """A registry that aggregates every process's metrics from the multiprocess directory.

    Built per process and never the default registry, so nothing a worker
    registers by accident leaks into (or doubles) the aggregated exposition.
    """
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AggregatingCollector(directory, LibraryMetrics(settings), settings.const_labels))
    return registry
