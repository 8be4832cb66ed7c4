"""Exact merge of multiprocess files into metric families, whatever order the files come in.

prometheus-client's ``MultiProcessCollector.merge`` adds floats in directory
order. Float addition is not associative, so when that order changes (a worker
starts or exits, a file is folded into the archive) a histogram ``_sum`` can
come out a few ulps *lower* than the scrape before, and Prometheus' ``rate()``
reads any decrease as a counter reset. Here every summed value is added with
``math.fsum`` (correctly rounded, order independent), and archive files carry
the rounding remainder of their folded totals (see promfork.dbfiles), so a
counter never goes backwards, before, during or after compaction. Where no
correctly rounded sum exists (a nan, +inf with -inf, finite values whose sum
overflows) the result is what prometheus-client's plain ``+`` gives: see
``exact_sum``.

Aggregation rules per gauge mode match prometheus-client's, and so does the
order of samples: grouped by label set (OpenMetrics requires each label set's
samples to be contiguous), label sets in the order first met, a histogram's
``_sum`` before its buckets and ``_count``. Files are read in the order given
(the collector sorts them by name). That order matters in one case only, as in
prometheus-client: a ``min``/``max`` gauge where one process holds nan and
another a number keeps whichever comes first, because every comparison with nan
is false. So such a value may change when compaction moves it into the archive
(which sorts after the pids' files).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from promfork import dbfiles

_SUMMED_GAUGES = ("sum", "livesum")


def exact_sum(values: Sequence[float]) -> float:
    """The correctly rounded sum of `values`, or what plain float addition gives where there is none.

    ``math.fsum`` raises on +inf with -inf (ValueError) and when finite partial
    sums overflow (OverflowError); prometheus-client's ``+`` gives nan and ±inf
    there, and a scrape must neither fail nor disagree with it. The fallback
    adds left to right, as prometheus-client does (not ``sum()``, which since
    Python 3.12 compensates).
    """
    try:
        return math.fsum(values)
    except (ValueError, OverflowError):
        total = 0.0
        for value in values:
            total += value
        return total


class _Family:
    __slots__ = ("addends", "buckets", "extremes", "label_sets", "metric", "per_pid", "recent")

    def __init__(self, metric: Metric) -> None:
        self.metric = metric
        # label set -> its sample keys (name, labels), both in the order first met: the exposition order.
        self.label_sets: dict[tuple, dict[tuple, None]] = defaultdict(dict)
        self.addends: dict[tuple, list[float]] = {}
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
                family = families[metric_name] = _Family(Metric(metric_name, help_text, file.kind))
            _add(family, file, name, labels, value, ts, archive)
    return [_finish(f) for f in families.values()], damaged


def _add(family: _Family, file: dbfiles.DbFile, name: str, labels: tuple, value: float, ts: float, archive: bool):
    if file.kind == "gauge":
        mode = file.mode
        if mode in ("all", "liveall"):
            labels = (*labels, ("pid", file.owner))
            key = (name, labels)
            family.per_pid[key] = value
        elif mode in _SUMMED_GAUGES:
            key = (name, labels)
            family.addends.setdefault(key, []).extend((value, ts) if archive else (value,))
        elif mode in ("max", "livemax", "min", "livemin"):
            key = (name, labels)
            current = family.extremes.get(key)
            # min()/max() keep the first argument unless the second is strictly
            # smaller/larger: prometheus-client's rule, nan included.
            pick = max if mode.endswith("max") else min
            family.extremes[key] = value if current is None else pick(current, value)
        else:  # mostrecent, livemostrecent
            key = (name, labels)
            current = family.recent.get(key)
            if not (ts > 0 and (current is None or ts > current[1])):
                return
            family.recent[key] = (value, ts)
        family.label_sets[labels].setdefault(key)
        return
    addends = (value, ts) if archive else (value,)
    if file.kind == "histogram":
        for i, (label, bound) in enumerate(labels):
            if label == "le":
                family.buckets[labels[:i] + labels[i + 1 :]][float(bound)].extend(addends)
                return
    key = (name, labels)
    family.addends.setdefault(key, []).extend(addends)
    family.label_sets[labels].setdefault(key)


def _finish(family: _Family) -> Metric:
    metric = family.metric
    values = {key: exact_sum(addends) for key, addends in family.addends.items()}
    values.update(family.extremes)
    values.update((key, value) for key, (value, _) in family.recent.items())
    values.update(family.per_pid)
    for labels, by_bound in family.buckets.items():
        keys = family.label_sets[labels]  # after the label set's _sum, or a new label set if there is none
        cumulative = 0.0
        for bound in sorted(by_bound):
            cumulative += exact_sum(by_bound[bound])  # bucket counts are whole numbers: exact
            key = (metric.name + "_bucket", (*labels, ("le", floatToGoString(bound))))
            keys[key] = None
            values[key] = cumulative
        keys[(metric.name + "_count", labels)] = None
        values[(metric.name + "_count", labels)] = cumulative
    metric.samples = [
        Sample(name, dict(labels), values[name, labels]) for keys in family.label_sets.values() for name, labels in keys
    ]
    return metric
