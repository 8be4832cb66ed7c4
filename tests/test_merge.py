"""reader.merge: the values and sample order of prometheus-client's MultiProcessCollector, valid OpenMetrics."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest as generate_text
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from promfork.reader.merge import merge_files

BOUNDS = ("0.1", "1.0", "+Inf")


def histogram(route: str, status: str, total: float, counts: tuple[int, int, int]) -> list[tuple]:
    """One label set's entries as prometheus-client writes them: ``_sum`` first, then each bucket's own count."""
    labels = {"route": route, "status": status}
    rows = [("latency_seconds", "latency_seconds_sum", labels, total, 0.0)]
    for le, n in zip(BOUNDS, counts, strict=True):
        rows.append(("latency_seconds", "latency_seconds_bucket", {**labels, "le": le}, float(n), 0.0))
    return rows


def summary(route: str, count: int, total: float) -> list[tuple]:
    labels = {"route": route}
    return [
        ("size_bytes", "size_bytes_count", labels, float(count), 0.0),
        ("size_bytes", "size_bytes_sum", labels, total, 0.0),
    ]


def counter(route: str, status: str, n: float) -> tuple:
    return ("requests", "requests_total", {"route": route, "status": status}, n, 0.0)


def gauge(name: str, slot: str, value: float, timestamp: float = 0.0) -> tuple:
    return (name, name, {"slot": slot}, value, timestamp)


# Two live workers and an archive. Label sets appear in a different order in each
# file, and some only in a later file. Values are multiples of 1/4: every order of
# addition gives the same float, so stock's plain + is the exact truth here.
FILES = {
    "histogram_101.db": histogram("/a", "200", 0.75, (1, 2, 0)) + histogram("/b", "404", 0.25, (1, 0, 0)),
    "histogram_102.db": histogram("/c", "500", 2.5, (0, 0, 1)) + histogram("/a", "200", 1.5, (0, 1, 1)),
    "histogram_archive.db": histogram("/b", "404", 3.0, (0, 1, 2)) + histogram("/d", "200", 0.5, (0, 1, 0)),
    "counter_101.db": [counter("/a", "200", 3.0), counter("/b", "404", 1.0)],
    "counter_102.db": [counter("/c", "500", 1.0), counter("/a", "200", 2.0)],
    "summary_101.db": summary("/a", 2, 10.5) + summary("/b", 1, 4.0),
    "summary_102.db": summary("/b", 3, 1.25) + summary("/a", 1, 0.5),
    "gauge_all_101.db": [gauge("temperature", "x", 1.0), gauge("temperature", "y", 2.0)],
    "gauge_all_102.db": [gauge("temperature", "y", 3.0)],
    "gauge_max_101.db": [gauge("peak", "x", 4.0), gauge("peak", "y", 1.0)],
    "gauge_max_102.db": [gauge("peak", "y", 7.0), gauge("peak", "z", 0.5)],
    "gauge_mostrecent_101.db": [gauge("last_seen", "x", 1.0, 100.0), gauge("last_seen", "y", 2.0, 300.0)],
    "gauge_mostrecent_102.db": [gauge("last_seen", "y", 5.0, 200.0), gauge("last_seen", "x", 6.0, 400.0)],
    "gauge_livesum_101.db": [gauge("busy", "x", 1.0), gauge("busy", "y", 1.0)],
    "gauge_livesum_102.db": [gauge("busy", "y", 2.0)],
}


@pytest.fixture
def paths(tmp_path: Path) -> list[str]:
    """The files above, written with prometheus-client's own MmapedDict, in the order the collector reads them."""
    for name, rows in FILES.items():
        store = MmapedDict(str(tmp_path / name))
        try:
            for metric, sample, labels, value, timestamp in rows:
                key = mmap_key(metric, sample, list(labels), list(labels.values()), "Help.")
                store.write_value(key, value, timestamp)
        finally:
            store.close()
    return sorted(str(tmp_path / name) for name in FILES)


class _Families:
    def __init__(self, metrics) -> None:
        self.metrics = list(metrics)

    def collect(self):
        return self.metrics


def exposition(metrics, generate) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(metrics))
    return generate(registry).decode()


def test_samples_come_in_stock_order_with_stock_values(paths):
    stock = [(m.name, m.type, m.samples) for m in MultiProcessCollector.merge(paths, accumulate=True)]
    merged, damaged = merge_files(paths)
    assert damaged == []
    assert [(m.name, m.type, m.samples) for m in merged] == stock


def test_each_histogram_label_set_is_contiguous_sum_then_buckets_then_count(paths):
    merged, _ = merge_files(paths)
    (latency,) = [m for m in merged if m.name == "latency_seconds"]
    order = [(s.name.removeprefix("latency_seconds"), s.labels["route"], s.labels.get("le")) for s in latency.samples]
    expected = []
    for route in ("/a", "/b", "/c", "/d"):  # first met: 101's /a, /b; then 102's /c; then the archive's /d
        expected += [("_sum", route, None)] + [("_bucket", route, le) for le in BOUNDS] + [("_count", route, None)]
    assert order == expected


def test_openmetrics_parser_accepts_the_exposition_and_reads_stock_values(paths):
    merged, _ = merge_files(paths)
    ours = list(parse_openmetrics(exposition(merged, generate_openmetrics)))
    stock = list(parse_openmetrics(exposition(MultiProcessCollector.merge(paths), generate_openmetrics)))
    assert {f.name: f.type for f in ours} == {
        "latency_seconds": "histogram",
        "size_bytes": "summary",
        "requests": "counter",
        "temperature": "gauge",
        "peak": "gauge",
        "last_seen": "gauge",
        "busy": "gauge",
    }
    assert ours == stock
    (latency,) = [f for f in ours if f.name == "latency_seconds"]
    assert {s.labels["route"] for s in latency.samples} == {"/a", "/b", "/c", "/d"}


def test_text_format_reads_the_same_as_stock(paths):
    merged, _ = merge_files(paths)
    ours = list(parse_text(exposition(merged, generate_text)))
    stock = list(parse_text(exposition(MultiProcessCollector.merge(paths), generate_text)))
    assert ours == stock
