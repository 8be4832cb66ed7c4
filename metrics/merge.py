"""Exact merge of multiprocess files into metric families, whatever order the files come in.

prometheus-client's ``MultiProcessCollector.merge`` adds floats in directory
order. Float addition is not associative, so when that order changes (a worker
starts or exits, a file is folded into the archive) a histogram ``_sum`` can
come out a few ulps *lower* than the scrape before, and Prometheus' ``rate()``
reads any decrease as a counter reset. Here every summed value is added with
``math.fsum`` (correctly rounded, order independent), and archive files carry
the rounding remainder of their folded totals (see metrics.dbfiles), so a
counter never goes backwards, before, during or after compaction. Aggregation
rules per gauge mode match prometheus-client's.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from metrics import dbfiles

_SUMMED_GAUGES = ("sum", "livesum")


class _Family:
    __slots__ = ("addends", "buckets", "extremes", "metric", "mode", "per_pid", "recent")

    def __init__(self, metric: Metric, mode: str) -> None:
        self.metric = metric
        self.mode = mode
        self.addends: dict[tuple, list[float]] = defaultdict(list)
        self.buckets: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.extremes: dict[tuple, float] = {}
        self.recent: dict[tuple, tuple[float, float]] = {}
        self.per_pid: dict[tuple, float] = {}


def _parse_file(path: str, key_cache: dict) -> list[tuple]:
    """Every (metric, sample name, labels, help, value, remainder-or-timestamp) of one file, or CorruptFile."""
    rows = []
    for key, (value, ts) in dbfiles.read_entries(path).items():
        parsed = key_cache.get(key)
        if parsed is None:
            try:
                metric_name, name, labels, help_text = json.loads(key)
                labels_key = tuple(sorted((str(k), str(v)) for k, v in labels.items()))
            except (ValueError, TypeError, AttributeError):
                raise dbfiles.CorruptFile(f"{os.path.basename(path)}: malformed key {key[:80]!r}") from None
            parsed = key_cache[key] = (metric_name, name, labels_key, help_text)
        rows.append((*parsed, value, ts))
    return rows


def merge_files(paths: Iterable[str]) -> tuple[list[Metric], list[str]]:
    """Merge every readable file; return the metrics and the names of files that could not be parsed."""
    families: dict[str, _Family] = {}
    damaged: list[str] = []
    key_cache: dict = {}
    for path in paths:
        file = dbfiles.parse_name(os.path.basename(path))
        try:
            rows = _parse_file(path, key_cache)
        except FileNotFoundError:
            continue  # a live gauge removed by mark_process_dead, or the file of a creator that just went
        except dbfiles.CorruptFile:
            damaged.append(file.name)
            continue
        archive = file.owner == dbfiles.ARCHIVE
        for metric_name, name, labels, help_text, value, ts in rows:
            family = families.get(metric_name)
            if family is None:
                family = families[metric_name] = _Family(Metric(metric_name, help_text, file.kind), file.mode)
            _add(family, file, name, labels, value, ts, archive)
    return [_finish(f) for f in families.values()], damaged


def _add(family: _Family, file: dbfiles.DbFile, name: str, labels: tuple, value: float, ts: float, archive: bool):
    if file.kind == "gauge":
        mode = file.mode
        if mode in ("all", "liveall"):
            family.per_pid[(name, (*labels, ("pid", file.owner)))] = value
        elif mode in _SUMMED_GAUGES:
            family.addends[(name, labels)].extend((value, ts) if archive else (value,))
        elif mode in ("max", "livemax", "min", "livemin"):
            current = family.extremes.get((name, labels))
            pick = max if mode.endswith("max") else min
            family.extremes[(name, labels)] = value if current is None else pick(current, value)
        else:  # mostrecent, livemostrecent
            current = family.recent.get((name, labels))
            if ts > 0 and (current is None or ts > current[1]):
                family.recent[(name, labels)] = (value, ts)
        return
    addends = (value, ts) if archive else (value,)
    if file.kind == "histogram":
        for i, (label, bound) in enumerate(labels):
            if label == "le":
                family.buckets[labels[:i] + labels[i + 1 :]][float(bound)].extend(addends)
                return
    family.addends[(name, labels)].extend(addends)


def _finish(family: _Family) -> Metric:
    metric = family.metric
    out = []
    for (name, labels), addends in family.addends.items():
        out.append(Sample(name, dict(labels), math.fsum(addends)))
    for key, value in family.extremes.items():
        out.append(Sample(key[0], dict(key[1]), value))
    for key, (value, _) in family.recent.items():
        out.append(Sample(key[0], dict(key[1]), value))
    for key, value in family.per_pid.items():
        out.append(Sample(key[0], dict(key[1]), value))
    for labels, by_bound in family.buckets.items():
        cumulative = 0.0
        for bound in sorted(by_bound):
            cumulative += math.fsum(by_bound[bound])  # bucket counts are whole numbers: exact
            out.append(Sample(metric.name + "_bucket", {**dict(labels), "le": floatToGoString(bound)}, cumulative))
        out.append(Sample(metric.name + "_count", dict(labels), cumulative))
    metric.samples = out
    return metric
