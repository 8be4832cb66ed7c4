"""promfork's OpenTelemetry MeterProvider: the metrics API, no SDK, every measurement stored in promfork's files.

    from opentelemetry.metrics import set_meter_provider
    from promfork.otel import MeterProvider

    set_meter_provider(MeterProvider())      # or OTEL_PYTHON_METER_PROVIDER=promfork

Every library that records through the OpenTelemetry metrics API (OTel's own
instrumentations, the OpenAI instrumentation, the app's own meters) then shows
in the aggregated /metrics, exact across Gunicorn workers, dead ones included:
no in-memory aggregate for a killed worker to take with it. Names, labels and
buckets follow OpenTelemetry's Prometheus exporter (promfork.otel.naming).

Observable instruments: their callbacks run in every process that created them
(each worker, for instruments created in the app), on a thread of that process,
every ``OTEL_METRIC_EXPORT_INTERVAL`` milliseconds (default 15000) and once
when the instrument is created. What each worker observed is stored in its
files and added up as promfork.otel.instruments describes.

``target_info`` carries the resource: ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES`` as OpenTelemetry reads them, with
``telemetry_sdk_name="promfork"``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence

from opentelemetry import metrics as api

from promfork import forks
from promfork.otel import instruments as kinds
from promfork.otel.naming import label_name, label_value, scope_labels

log = logging.getLogger(__name__)

DEFAULT_CARDINALITY_LIMIT = 2000  # attribute sets per instrument and process, as OpenTelemetry's SDK
DEFAULT_OBSERVE_INTERVAL = 15.0  # seconds between two rounds of observable callbacks


class MeterProvider(api.MeterProvider):
    """Meters whose instruments store into promfork's multiprocess files.

    `cardinality_limit`: attribute sets per instrument (and process) before the
    overflow series; default 2000, or ``PROMFORK_OTEL_CARDINALITY_LIMIT``.
    `observe_interval`: seconds between rounds of observable callbacks.
    `resource`: attributes for ``target_info``, on top of those the environment names.
    """

    def __init__(
        self,
        *,
        cardinality_limit: int | None = None,
        observe_interval: float | None = None,
        resource: Mapping[str, object] | None = None,
    ) -> None:
        self.cardinality_limit = cardinality_limit or _limit_from_environment()
        self.observe_interval = observe_interval or _interval_from_environment()
        self.resource = {**_resource_from_environment(), **(resource or {})}
        self._meters: dict[tuple, Meter] = {}
        self._lock = threading.Lock()
        self._observer = _Observer(self.observe_interval)
        self._target_info_written = False

    def get_meter(self, name: str, version: str | None = None, schema_url: str | None = None, attributes=None):
        """The meter of instrumentation scope `name` (one per name, version, schema and attributes)."""
        key = (name, version or "", schema_url or "", tuple(sorted((attributes or {}).items())))
        with self._lock:
            meter = self._meters.get(key)
            if meter is None:
                meter = self._meters[key] = Meter(self, name, version, schema_url, attributes)
            self._write_target_info()
        return meter

    def _write_target_info(self) -> None:
        if self._target_info_written:
            return
        try:
            from prometheus_client import Gauge

            labels = {label_name(k): label_value(v) for k, v in self.resource.items()}
            names = sorted(labels)
            info = Gauge("target_info", "Target metadata", names, registry=None, multiprocess_mode="livemax")
            info.labels(*(labels[n] for n in names)).set(1)
            self._target_info_written = True
        except Exception as exc:  # never fail the instrumented library
            log.warning("promfork.otel: target_info not written: %s", exc)


class Meter(api.Meter):
    """One instrumentation scope's instruments."""

    def __init__(self, provider: MeterProvider, name: str, version, schema_url, attributes) -> None:
        super().__init__(name, version, schema_url)
        self._provider = provider
        self._scope = scope_labels(name, version, schema_url, attributes)
        self._instruments: dict[tuple, object] = {}
        self._lock = threading.Lock()

    def _series(self, kind: str, name: str, unit: str, description: str, bounds=None) -> kinds.Series:
        return kinds.Series(kind, name, unit, description, self._scope, self._provider.cardinality_limit, bounds)

    def _instrument(self, kind: str, make: Callable[[], object], name: str, unit: str, description: str):
        # One instrument per (name, kind, unit, description), as the SDK: asking again returns it.
        key = (name.strip().lower(), kind, unit or "", description or "")
        with self._lock:
            found = self._instruments.get(key)
            if found is None:
                found = self._instruments[key] = make()
        return found

    def create_counter(self, name: str, unit: str = "", description: str = "") -> api.Counter:
        return self._instrument(
            kinds.COUNTER, lambda: kinds.Counter(self._series(kinds.COUNTER, name, unit, description)),
            name, unit, description,
        )  # fmt: skip

    def create_up_down_counter(self, name: str, unit: str = "", description: str = "") -> api.UpDownCounter:
        return self._instrument(
            kinds.UP_DOWN, lambda: kinds.UpDownCounter(self._series(kinds.UP_DOWN, name, unit, description)),
            name, unit, description,
        )  # fmt: skip

    def create_histogram(
        self,
        name: str,
        unit: str = "",
        description: str = "",
        *,
        explicit_bucket_boundaries_advisory: Sequence[float] | None = None,
    ) -> api.Histogram:
        bounds = explicit_bucket_boundaries_advisory
        if bounds is not None and not all(isinstance(b, int | float) for b in bounds):
            log.warning("promfork.otel: %s: explicit_bucket_boundaries_advisory must be numbers; ignored", name)
            bounds = None
        return self._instrument(
            kinds.HISTOGRAM,
            lambda: kinds.Histogram(self._series(kinds.HISTOGRAM, name, unit, description, bounds)),
            name, unit, description,
        )  # fmt: skip

    def create_gauge(self, name: str, unit: str = "", description: str = ""):
        return self._instrument(
            kinds.GAUGE, lambda: kinds.Gauge(self._series(kinds.GAUGE, name, unit, description)),
            name, unit, description,
        )  # fmt: skip

    def _observable(self, kind: str, cls, name: str, callbacks, unit: str, description: str):
        def make():
            instrument = cls(self._series(kind, name, unit, description), callbacks)
            self._provider._observer.add(instrument)
            return instrument

        return self._instrument(kind, make, name, unit, description)

    def create_observable_counter(self, name: str, callbacks=None, unit: str = "", description: str = ""):
        return self._observable(kinds.OBSERVED_COUNTER, kinds.ObservableCounter, name, callbacks, unit, description)

    def create_observable_up_down_counter(self, name: str, callbacks=None, unit: str = "", description: str = ""):
        return self._observable(
            kinds.OBSERVED_UP_DOWN, kinds.ObservableUpDownCounter, name, callbacks, unit, description
        )

    def create_observable_gauge(self, name: str, callbacks=None, unit: str = "", description: str = ""):
        return self._observable(kinds.OBSERVED_GAUGE, kinds.ObservableGauge, name, callbacks, unit, description)


class _Observer:
    """The thread that runs observable callbacks in this process (started again in a forked child)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.instruments: list[kinds.Observable] = []
        self._pid = 0
        self._lock = threading.Lock()
        _observers.add(self)

    def add(self, instrument: kinds.Observable) -> None:
        """Observe `instrument` now, then every interval."""
        instrument.observe(api.CallbackOptions(timeout_millis=self.interval * 1000))
        with self._lock:
            self.instruments.append(instrument)
            self._ensure_thread()

    def _ensure_thread(self) -> None:
        if self._pid == os.getpid() or not self.instruments:
            return
        try:
            threading.Thread(target=self._run, args=(os.getpid(),), name="promfork-otel-observer", daemon=True).start()
        except RuntimeError as exc:  # no threads left (a pids limit): observe again when the next one is added
            log.error("promfork.otel: cannot start the thread for observable callbacks: %s", exc)
            return
        self._pid = os.getpid()

    def _run(self, pid: int) -> None:
        while os.getpid() == pid:
            time.sleep(self.interval)
            options = api.CallbackOptions(timeout_millis=self.interval * 1000)
            for instrument in list(self.instruments):
                instrument.observe(options)

    def forked(self) -> None:
        self._lock = threading.Lock()  # the parent's may have been held by one of its threads
        self._pid = 0
        self._ensure_thread()


_observers: weakref.WeakSet[_Observer] = weakref.WeakSet()


def _restart_observers() -> None:
    for observer in list(_observers):
        observer.forked()


forks.after_fork_in_child(forks.OTEL_OBSERVERS, _restart_observers)


def _limit_from_environment() -> int:
    raw = os.environ.get("PROMFORK_OTEL_CARDINALITY_LIMIT", "").strip()
    if not raw:
        return DEFAULT_CARDINALITY_LIMIT
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"PROMFORK_OTEL_CARDINALITY_LIMIT={raw!r}: a positive whole number, e.g. 2000")
    return int(raw)


def _interval_from_environment() -> float:
    raw = os.environ.get("OTEL_METRIC_EXPORT_INTERVAL", "").strip()
    if not raw:
        return DEFAULT_OBSERVE_INTERVAL
    try:
        milliseconds = float(raw)
    except ValueError:
        milliseconds = -1
    if not milliseconds > 0:
        raise ValueError(f"OTEL_METRIC_EXPORT_INTERVAL={raw!r}: milliseconds, a positive number, e.g. 15000")
    return milliseconds / 1000


def _resource_from_environment() -> dict[str, object]:
    """The resource attributes OpenTelemetry's environment variables name, and promfork as the SDK."""
    from promfork import __version__

    resource: dict[str, object] = {
        "telemetry.sdk.language": "python",
        "telemetry.sdk.name": "promfork",
        "telemetry.sdk.version": __version__,
    }
    for pair in filter(None, (p.strip() for p in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","))):
        key, equals, value = pair.partition("=")
        if equals and key.strip():
            from urllib.parse import unquote

            resource[key.strip()] = unquote(value.strip())
    service = os.environ.get("OTEL_SERVICE_NAME", "").strip()
    resource["service.name"] = service or resource.get("service.name") or "unknown_service:python"
    return resource
