"""Exact merge of multiprocess files into metric families, whatever order the files come in.

prometheus-client's ``MultiProcessCollector.merge`` adds floats in directory
order. Float addition is not associative, so when that order changes (a worker
starts or exits, a file is folded into the archive) a histogram ``_sum`` can
come out a few ulps *lower* than the scrape before, and Prometheus' ``rate()``
reads any decrease as a counter reset. Here every summed value is added with
``math.fsum`` (correctly rounded, order independent), and archive files carry
the rounding remainder of their folded totals (see promfork.directory.fileformat), so a
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

``merge_files`` merges a whole directory; promfork.reader.incremental, which keeps what it
read between scrapes, merges a family whole with ``FamilyMerge`` when its
entries come or go, and one label set again with a ``SummedLabelSet`` plan when
only values moved: the rules above live here, once, for both.
"""

from __future__ import annotations

import json
import math
import operator
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from promfork.directory import fileformat, filenames

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


class FamilyMerge:
    """The merge of one metric family's samples, added file by file in file order.

    ``merge_files`` feeds one per family; promfork.reader.incremental feeds one per label
    set whose inputs changed, which gives that label set's samples exactly as a
    whole-family merge would.
    """

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

    def add(self, file: filenames.DbFile, name: str, labels: tuple, value: float, ts: float) -> None:
        """Add one entry of `file` (value and timestamp-or-remainder as stored)."""
        _add(self, file, name, labels, value, ts, file.owner == filenames.ARCHIVE)

    def add_rows(self, file: filenames.DbFile, rows: Iterable[tuple], values: Iterable[tuple[float, float]]) -> None:
        """Add entries of `file` in file order: parsed keys (as ``parse_key`` gives them) and (value, timestamp)."""
        archive = file.owner == filenames.ARCHIVE
        for (_, name, labels, _), (value, ts) in zip(rows, values, strict=True):
            _add(self, file, name, labels, value, ts, archive)

    def finish(self) -> Metric:
        """The family's metric with its merged samples, in prometheus-client's order."""
        return _finish(self)

    def finish_by_label_set(self) -> list[tuple[tuple, list[Sample]]]:
        """The merged samples of each label set (keyed as ``group_key`` keys them), label sets in exposition order."""
        values = _values(self)
        return [
            (labels, [Sample(name, dict(sample_labels), values[name, sample_labels]) for name, sample_labels in keys])
            for labels, keys in self.label_sets.items()
        ]


def is_summed(file: filenames.DbFile) -> bool:
    """True for files whose values are added up across processes (counter, histogram, summary, sum gauges)."""
    return file.kind != "gauge" or file.mode in _SUMMED_GAUGES


def orders_by_value(file: filenames.DbFile) -> bool:
    """True for files whose values decide whether a label set is exposed at all (mostrecent gauges need ts > 0)."""
    return file.kind == "gauge" and file.mode in ("mostrecent", "livemostrecent")


class SummedLabelSet:
    """One label set whose inputs are all summed (see ``is_summed``), merged again from new values at little cost.

    Built once from its inputs' keys; ``values`` then gives the label set's
    sample values, in ``keys`` order, exactly as ``FamilyMerge`` would from
    the same inputs in the same order: exact sums, archive remainders,
    cumulative buckets, ``_count`` from the ``+Inf`` total.
    """

    def __init__(self, metric_name: str, inputs: Sequence[tuple[filenames.DbFile, str, tuple]]) -> None:
        sums: dict[tuple, list[int]] = {}
        buckets: dict[float, list[int]] = {}
        bucket_labels: tuple = ()
        for i, (file, name, labels) in enumerate(inputs):
            refs = (i, ~i) if file.owner == filenames.ARCHIVE else (i,)  # ~i: the remainder, stored as timestamp
            if file.kind == "histogram":
                stripped, bucket = group_key(file, labels)
                if bucket:
                    buckets.setdefault(float(dict(labels)["le"]), []).extend(refs)
                    bucket_labels = stripped
                    continue
            sums.setdefault((name, labels), []).extend(refs)
        count = len(inputs)

        def getter(refs: list[int]):  # reads the addends out of values + stamps (see values()) in one C call
            at = [r if r >= 0 else count + ~r for r in refs]
            return operator.itemgetter(*at) if len(at) > 1 else lambda both, i=at[0]: (both[i],)

        self._sums = [getter(refs) for refs in sums.values()]
        self._bounds = [getter(buckets[bound]) for bound in sorted(buckets)]
        keys = dict.fromkeys(sums)
        if buckets:
            for bound in sorted(buckets):
                keys[(metric_name + "_bucket", (*bucket_labels, ("le", floatToGoString(bound))))] = None
            count_key = (metric_name + "_count", bucket_labels)
            self._count_at = list(keys).index(count_key) if count_key in keys else len(keys)
            keys[count_key] = None
        self.keys: list[tuple[str, tuple]] = list(keys)

    def values(self, values: Sequence[float], stamps: Sequence[float]) -> list[float]:
        """The label set's sample values from each input's value and timestamp (the remainder in archives)."""
        both = [*values, *stamps]
        out = [exact_sum(get(both)) for get in self._sums]
        if self._bounds:
            cumulative = 0.0
            for get in self._bounds:
                cumulative += exact_sum(get(both))
                out.append(cumulative)
            if self._count_at < len(self._sums):
                out[self._count_at] = cumulative  # a stored _count is replaced by the bucket total, as in _finish
            else:
                out.append(cumulative)
        return out


def parse_key(key: str) -> tuple[str, str, tuple, str]:
    """A file entry's key as (metric name, sample name, labels sorted by name, help); ValueError if malformed.

    Labels become a sorted tuple of string pairs: the form every merge rule and
    every cache of parsed keys (promfork.reader.incremental) uses.
    """
    try:
        metric_name, name, labels, help_text = json.loads(key)
        return metric_name, name, tuple(sorted((str(k), str(v)) for k, v in labels.items())), help_text
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"malformed key {key[:80]!r}") from None


def group_key(file: filenames.DbFile, labels: tuple) -> tuple[tuple, bool]:
    """The label set a sample of `file` with `labels` is exposed under, and whether it is a histogram bucket.

    A label set's samples are merged and exposed together (a histogram's buckets,
    ``_sum`` and ``_count``; an ``all`` gauge's value per process, whose label
    set gains ``pid``). Buckets place their label set after the others that were
    met first through a non-bucket sample: see ``FamilyMerge.finish``.
    """
    if file.kind == "gauge":
        if file.mode in ("all", "liveall"):
            return (*labels, ("pid", file.owner)), False
        return labels, False
    if file.kind == "histogram":
        for i, (label, _) in enumerate(labels):
            if label == "le":
                return labels[:i] + labels[i + 1 :], True
    return labels, False


def _parse_file(path: str, key_cache: dict) -> list[tuple]:
    """Every (metric, sample name, labels, help, value, remainder-or-timestamp) of one file, or CorruptFile."""
    rows = []
    for key, (value, ts) in fileformat.read_entries(path).items():
        parsed = key_cache.get(key)
        if parsed is None:
            try:
                parsed = key_cache[key] = parse_key(key)
            except ValueError as exc:
                raise fileformat.CorruptFile(f"{os.path.basename(path)}: {exc}") from None
        rows.append((*parsed, value, ts))
    return rows


def merge_files(paths: Iterable[str]) -> tuple[list[Metric], list[str]]:
    """Merge every readable file; return the metrics and the names of files that could not be parsed."""
    families: dict[str, FamilyMerge] = {}
    damaged: list[str] = []
    key_cache: dict = {}
    for path in paths:
        file = filenames.parse_name(os.path.basename(path))
        try:
            rows = _parse_file(path, key_cache)
        except FileNotFoundError:
            continue  # a live gauge removed by mark_process_dead, or the file of a creator that just went
        except fileformat.CorruptFile:
            damaged.append(file.name)
            continue
        archive = file.owner == filenames.ARCHIVE
        for metric_name, name, labels, help_text, value, ts in rows:
            family = families.get(metric_name)
            if family is None:
                family = families[metric_name] = FamilyMerge(Metric(metric_name, help_text, file.kind))
            _add(family, file, name, labels, value, ts, archive)
    return [_finish(f) for f in families.values()], damaged


def _add(family: FamilyMerge, file: filenames.DbFile, name: str, labels: tuple, value: float, ts: float, archive: bool):
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


def _finish(family: FamilyMerge) -> Metric:
    values = _values(family)
    family.metric.samples = [
        Sample(name, dict(labels), values[name, labels]) for keys in family.label_sets.values() for name, labels in keys
    ]
    return family.metric


def _values(family: FamilyMerge) -> dict[tuple, float]:
    """Every sample key's merged value; registers bucket and _count keys in their label sets."""
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
    return values
