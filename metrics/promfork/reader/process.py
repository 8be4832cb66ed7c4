"""Per-worker process metrics (memory, CPU, fds, threads), read at scrape time, labelled by worker slot.

Labelling by pid would add a new series for every worker that ever lived; under
``--max-requests`` that grows without bound. Instead the master gives each new
worker the lowest free slot (0 … workers-1) and the worker records its pid in
``<slot>.slot`` in the multiprocess directory; the master records itself as
``master.slot``. Any process serving /metrics reads /proc for the pids named
there, at scrape time: no thread and no per-request cost in the workers. When a
slot's worker is replaced, its CPU counter restarts from zero, which Prometheus'
``rate()`` handles as a counter reset. Linux only (/proc); elsewhere no samples.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from promfork.directory import filenames

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def read_slots(directory: str) -> dict[str, int]:
    """Every recorded slot -> pid."""
    slots = {}
    for name in os.listdir(directory):
        slot = filenames.slot_of(name)
        if slot is not None:
            with contextlib.suppress(OSError, ValueError), open(os.path.join(directory, name)) as src:
                slots[slot] = int(src.read().strip())
    return slots


def _boot_time() -> float:
    with open("/proc/stat") as src:
        for line in src:
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


def read_process(pid: int) -> dict[str, float] | None:
    """RSS, CPU, threads, start time and open fds of `pid` from /proc; None if it has exited."""
    try:
        with open(f"/proc/{pid}/stat") as src:
            stat = src.read()
        # The command name (field 2) may contain spaces; fields after it are fixed.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] in ("Z", "X"):
            return None  # exited, not yet reaped: nothing left to measure
        try:
            fds = float(len(os.listdir(f"/proc/{pid}/fd")))
        except PermissionError:
            fds = float("nan")
    except (OSError, ValueError):
        return None
    return {
        "ppid": float(fields[1]),
        "cpu": (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS,
        "threads": float(fields[17]),
        "start": int(fields[19]) / _CLOCK_TICKS,
        "rss": float(int(fields[21]) * _PAGE_SIZE),
        "fds": fds,
    }


class WorkerProcessCollector(Collector):
    """process_* metrics of the master and every live worker, labelled by slot."""

    def __init__(self, directory: str, namespace: str = "", const_labels: Mapping[str, str] | None = None) -> None:
        self.directory = directory
        self.prefix = f"{namespace}_" if namespace else ""
        self.const_labels = dict(const_labels or {})

    def collect(self) -> Iterable[Metric]:
        """Read /proc for every recorded slot whose process still belongs to this master."""
        if not os.path.isdir("/proc"):
            return []
        slots = read_slots(self.directory)
        master = slots.get(filenames.MASTER_SLOT)
        names = list(self.const_labels)
        labels = ["worker", *names]
        p = self.prefix
        rss = GaugeMetricFamily(f"{p}process_resident_memory_bytes", "Resident memory by worker slot.", labels=labels)
        cpu = CounterMetricFamily(f"{p}process_cpu_seconds", "User+system CPU by worker slot.", labels=labels)
        fds = GaugeMetricFamily(f"{p}process_open_fds", "Open file descriptors by worker slot.", labels=labels)
        threads = GaugeMetricFamily(f"{p}process_threads", "OS threads by worker slot.", labels=labels)
        start = GaugeMetricFamily(
            f"{p}process_start_time_seconds", "Start time (Unix seconds) by worker slot.", labels=labels
        )
        boot = _boot_time()
        for slot, pid in sorted(slots.items()):
            info = read_process(pid)
            # A slot file can outlive its worker, and its pid can be reused: trust it
            # only while the process is the master or one of the master's children.
            if info is None or (slot != filenames.MASTER_SLOT and int(info["ppid"]) != master):
                continue
            values = [slot, *self.const_labels.values()]
            rss.add_metric(values, info["rss"])
            cpu.add_metric(values, info["cpu"])
            fds.add_metric(values, info["fds"])
            threads.add_metric(values, info["threads"])
            start.add_metric(values, boot + info["start"])
        return [rss, cpu, fds, threads, start]
