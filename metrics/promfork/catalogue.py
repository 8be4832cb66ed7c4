"""The metric catalogue (docs/metrics.md), generated from the metric definitions in code.

    python -m webapp.catalogue > docs/metrics.md     (the gateway's definitions included)

A test regenerates it and fails when the committed file is out of date.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from promfork import client
from promfork.config import Settings

HEADER = """# Metric catalogue

Generated from the metric definitions in code by `promfork.catalogue`; do not edit by hand.
`METRICS_NAMESPACE` prefixes every name; `METRICS_CONST_LABELS` adds labels to every series.

| name | type | labels | help |
|---|---|---|---|
"""


def _rows(registry: CollectorRegistry) -> list[tuple[str, str, str, str]]:
    rows = []
    for collector in client.collectors(registry):
        describe = getattr(collector, "describe", None)
        for metric in (describe() if describe else None) or collector.collect():
            labels = client.declared_labels(collector)
            if labels is None:
                labels = sorted({k for s in metric.samples for k in s.labels if k not in ("le", "quantile")})
            name = metric.name + ("_total" if metric.type == "counter" else "")
            kind = metric.type
            mode = client.gauge_mode(collector)
            if kind == "gauge" and mode:
                kind = f"gauge ({mode})"
            rows.append((name, kind, ", ".join(labels) or "—", metric.documentation))
    return rows


def build_catalogue(*definers: Callable[[CollectorRegistry, Settings], None]) -> str:
    """Markdown table of promfork's own metrics, then those each definer registers.

    A definer creates an application's metrics in the registry it is handed (the
    gateway's is ``webapp.catalogue``); the library never imports an application.
    """
    from promfork.http.recorder import HttpRecorder
    from promfork.master.hooks import _Lifecycle
    from promfork.master.slots import MASTER, record_slot
    from promfork.reader.collector import LibraryMetrics
    from promfork.reader.process import WorkerProcessCollector

    settings = Settings()
    registry = CollectorRegistry()
    HttpRecorder(settings, registry)
    for define in definers:
        define(registry, settings)
    _Lifecycle(settings, registry)
    LibraryMetrics(settings, registry)
    with tempfile.TemporaryDirectory() as directory:
        record_slot(directory, MASTER, os.getpid())
        registry.register(WorkerProcessCollector(directory))
        rows = _rows(registry)
    return HEADER + "".join(f"| `{n}` | {t} | {lab} | {h} |\n" for n, t, lab, h in rows)
