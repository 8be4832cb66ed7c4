"""OpenTelemetry instruments that store each measurement straight into promfork's multiprocess files.

Every instrument keeps one prometheus-client metric object per set of label
names it has met (registry=None: in multiprocess mode the values live in the
process's files) and, per attribute set, the labelled child bound once through
promfork's value store (``Samples``: one locked update). What an instrument
becomes, and how workers add up:

| instrument | Prometheus type | across workers (live and dead) |
|---|---|---|
| Counter, ObservableCounter | counter | sum; a dead worker's count stays (folded) |
| UpDownCounter, ObservableUpDownCounter | gauge (``livesum``) | sum of the live workers: a current state |
| Histogram | histogram | buckets, sum and count added up |
| Gauge | gauge (``mostrecent``) | the value set last, in any worker |
| ObservableGauge | gauge (``livemostrecent``) | the latest observation of a live worker |

A measurement never raises into the caller. As OpenTelemetry's SDK does, one
that cannot count is dropped: a non-finite amount, a negative amount on a
counter or histogram. So is one whose labels prometheus-client refuses
(``le`` on a histogram); each kind is logged once per instrument. Past the
cardinality limit (attribute sets per instrument in this process), measurements
go to one series labelled ``otel_metric_overflow="true"``, as the SDK's do.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from types import GeneratorType

from opentelemetry import metrics as api
from opentelemetry.metrics import _Gauge

from promfork import client
from promfork.otel import naming
from promfork.trace import opentelemetry_trace
from promfork.writer import exemplars
from promfork.writer.values import Samples

log = logging.getLogger(__name__)

COUNTER, UP_DOWN, HISTOGRAM, GAUGE = "counter", "up_down_counter", "histogram", "gauge"
OBSERVED_COUNTER, OBSERVED_UP_DOWN, OBSERVED_GAUGE = "observable_counter", "observable_up_down", "observable_gauge"
_MODES = {UP_DOWN: "livesum", GAUGE: "mostrecent", OBSERVED_UP_DOWN: "livesum", OBSERVED_GAUGE: "livemostrecent"}


class Series:
    """What every instrument of promfork.otel shares: naming, binding attribute sets, the cardinality limit."""

    def __init__(
        self,
        kind: str,
        name: str,
        unit: str,
        description: str,
        scope: Mapping[str, str],
        limit: int,
        bounds: Sequence[float] | None = None,
    ) -> None:
        self.kind = kind
        self.prometheus_name = naming.metric_name(name)
        self.unit = naming.unit_suffix(unit)
        self.description = description or ""
        self.scope = tuple(scope.items())
        self.limit = limit
        self.bounds = tuple(float(b) for b in bounds) if bounds else naming.DEFAULT_BOUNDARIES
        self.bound: dict = {}  # attributes as given (items, in order) -> (updater, child)
        self._by_labels: dict[tuple, tuple] = {}  # the label set -> (updater, child): counted against the limit
        self._metrics: dict[tuple[str, ...], object] = {}  # label names -> prometheus-client metric
        self._warned: set[str] = set()

    def find(self, attributes: Mapping | None) -> tuple:
        """(updater, child) of an attribute set: bound on first use."""
        try:
            key = tuple(attributes.items()) if attributes else ()
            found = self.bound.get(key)
        except TypeError:  # a list among the values: unhashable as given
            key = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in attributes.items())
            found = self.bound.get(key)
        if found is None:
            found = self.bound[key] = self._bind(attributes)
        return found

    def _bind(self, attributes: Mapping | None) -> tuple:
        labels = dict(self.scope)  # an attribute of the same name wins, as in OpenTelemetry's exporter
        labels.update((naming.label_name(str(k)), naming.label_value(v)) for k, v in (attributes or {}).items())
        label_set = tuple(sorted(labels.items()))
        found = self._by_labels.get(label_set)
        if found is not None:
            return found
        if len(self._by_labels) >= self.limit:
            label_set = tuple(sorted((*self.scope, naming.OVERFLOW_LABEL)))
            found = self._by_labels.get(label_set)
            if found is not None:
                return found
            self.warn_once("overflow", f"more than {self.limit} attribute sets; the rest go to otel_metric_overflow")
        names = tuple(n for n, _ in label_set)
        child = self._metric(names).labels(*(v for _, v in label_set))
        found = self._by_labels[label_set] = (Samples(child), child)
        return found

    def _metric(self, names: tuple[str, ...]):
        metric = self._metrics.get(names)
        if metric is None:
            from prometheus_client import Counter, Gauge, Histogram

            common = dict(labelnames=names, registry=None, unit=self.unit)
            if self.kind in (COUNTER, OBSERVED_COUNTER):
                metric = Counter(self.prometheus_name, self.description, **common)
            elif self.kind == HISTOGRAM:
                metric = Histogram(self.prometheus_name, self.description, buckets=self.bounds, **common)
            else:
                metric = Gauge(self.prometheus_name, self.description, multiprocess_mode=_MODES[self.kind], **common)
            self._metrics[names] = metric
        return metric

    def warn_once(self, what: str, message: str) -> None:
        """Log `message` the first time `what` happens to this instrument."""
        if what not in self._warned:
            self._warned.add(what)
            log.warning("promfork.otel: %s: %s", self.prometheus_name, message)

    def dropped(self, what: str, error: BaseException) -> None:
        self.warn_once(what, f"measurement dropped ({error})")


def _finite(amount: float) -> bool:
    return amount == amount and amount not in (math.inf, -math.inf)


class Counter(api.Counter):
    """A monotonic sum: ``add`` takes non-negative amounts."""

    def __init__(self, series: Series) -> None:
        self._series = series

    def add(self, amount, attributes=None, context=None) -> None:
        if not amount >= 0 or amount == math.inf:  # negative, NaN or inf: dropped, as the SDK drops them
            return
        try:
            self._series.find(attributes)[0].update(amount)
        except Exception as exc:
            self._series.dropped("add", exc)


class UpDownCounter(api.UpDownCounter):
    """A sum that goes up and down: a current state, summed over the live workers."""

    def __init__(self, series: Series) -> None:
        self._series = series

    def add(self, amount, attributes=None, context=None) -> None:
        if not _finite(amount):
            return
        try:
            self._series.find(attributes)[0].update(amount)
        except Exception as exc:
            self._series.dropped("add", exc)


class Histogram(api.Histogram):
    """A distribution; a measurement under a sampled span leaves its trace as the bucket's exemplar."""

    def __init__(self, series: Series) -> None:
        self._series = series

    def record(self, amount, attributes=None, context=None) -> None:
        if not amount >= 0 or amount == math.inf:
            return
        try:
            updater, child = self._series.find(attributes)
            updater.update(amount)
            trace = opentelemetry_trace(context)
            if trace is not None:
                exemplars.record_trace(child, (), amount, trace)
        except Exception as exc:
            self._series.dropped("record", exc)


class Gauge(_Gauge):
    """The value set last, in any worker."""

    def __init__(self, series: Series) -> None:
        self._series = series

    def set(self, amount, attributes=None, context=None) -> None:
        if not _finite(amount):
            return
        try:
            self._series.find(attributes)[1].set(amount)
        except Exception as exc:
            self._series.dropped("set", exc)


class Observable:
    """An observable instrument's callbacks, and how an observation is stored (see promfork.otel.observer)."""

    def __init__(self, series: Series, callbacks: Sequence[Callable] | None) -> None:
        self._series = series
        self.callbacks = list(callbacks or ())
        for callback in self.callbacks:
            if isinstance(callback, GeneratorType):
                next(callback)  # a generator callback is primed once, then sent the options each round

    def observe(self, options: api.CallbackOptions) -> None:
        """Run every callback once and store what it observed; a failing callback is logged, never raised."""
        for callback in self.callbacks:
            try:
                observations = callback.send(options) if isinstance(callback, GeneratorType) else callback(options)
                totals: dict = {}
                for observation in observations or ():
                    attributes = observation.attributes
                    key = tuple(sorted((attributes or {}).items(), key=lambda kv: kv[0]))
                    previous = totals.get(key, (attributes, 0.0))[1]
                    # Observations of one attribute set in one callback add up (the SDK sums them too).
                    totals[key] = (attributes, previous + observation.value)
                for attributes, value in totals.values():
                    if _finite(value):
                        self._store(self._series.find(attributes)[1], value)
            except Exception as exc:
                self._series.warn_once("callback", f"callback failed ({exc!r}); its observations are skipped")

    def _store(self, child, value: float) -> None:
        if self._series.kind == OBSERVED_COUNTER:
            total = client.values_of(child)[0]  # a counter's value: set to what was observed, not added
            total.set(value)
        else:
            child.set(value)


class ObservableCounter(Observable, api.ObservableCounter):
    """A monotonic sum observed by a callback: each worker's observed total; a dead worker's stays."""


class ObservableUpDownCounter(Observable, api.ObservableUpDownCounter):
    """A sum observed by a callback: the live workers' observations added up."""


class ObservableGauge(Observable, api.ObservableGauge):
    """A value observed by a callback: the latest observation of a live worker."""
