"""Exemplars across worker processes: each process's most recent trace per histogram bucket.

(Interface fixed; storage to be filled in.) The reader (promfork.collector) calls
``read_exemplars(directory)`` once per OpenMetrics scrape and appends each
exemplar to the bucket line it belongs to.
"""

from __future__ import annotations

from prometheus_client.samples import Exemplar

# (bucket sample name, e.g. "http_request_duration_seconds_bucket",
#  labels as a tuple of (name, value) pairs sorted by name, "le" included and
#  formatted as prometheus_client.utils.floatToGoString formats it)
ExemplarKey = tuple[str, tuple[tuple[str, str], ...]]


def read_exemplars(directory: str) -> dict[ExemplarKey, Exemplar]:
    """The most recent exemplar of every bucket over every process's exemplar file in `directory`."""
    return {}
