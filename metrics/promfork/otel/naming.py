"""The names, units, labels and bucket bounds OpenTelemetry's own Prometheus exporter gives an instrument.

The rules of ``opentelemetry-exporter-prometheus`` (0.66b2, ``_mapping.py`` and
``PrometheusMetricReader``), so that a dashboard built on OTel's exporter keeps
working when promfork stores the same instruments:

* metric name: the instrument name, lowercased (as the SDK stores it), a
  leading digit replaced by ``_``, every run of characters outside
  ``[a-zA-Z0-9:]`` replaced by one ``_``; then the unit's suffix (``s`` →
  ``_seconds``, ``By`` → ``_bytes``, ``{request}`` → nothing, ``1`` → nothing)
  unless the name already ends with it; counters end in ``_total``;
* label names: attribute keys, a leading digit replaced by ``_``, every run of
  characters outside ``[a-zA-Z0-9]`` by one ``_``;
* label values: a string as it is, anything else as ``json.dumps`` writes it
  (``True`` → ``true``, ``[1, 2]`` → ``[1, 2]``);
* scope labels on every series: ``otel_scope_name``, ``otel_scope_version``,
  ``otel_scope_schema_url`` (empty when unset) and ``otel_scope_<key>`` per
  meter attribute;
* histogram bounds: the instrument's ``explicit_bucket_boundaries_advisory``,
  else OpenTelemetry's defaults (``DEFAULT_BOUNDARIES``).

Two departures, both invisible to Prometheus: ``le`` is written the way
prometheus-client writes it (``1.0`` where the exporter writes ``1``; Prometheus 3
normalizes both to one), and a series is not padded with empty labels for the
attribute keys other series of the instrument have (an empty label is the same
as no label to Prometheus).
"""

from __future__ import annotations

import json
import re

DEFAULT_BOUNDARIES = (0.0, 5.0, 10.0, 25.0, 50.0, 75.0, 100.0, 250.0, 500.0, 750.0, 1000.0, 2500.0, 5000.0,
                      7500.0, 10000.0)  # fmt: skip
OVERFLOW_LABEL = ("otel_metric_overflow", "true")  # the series every attribute set past the limit goes to
_UNITS = {
    "d": "days", "h": "hours", "min": "minutes", "s": "seconds", "ms": "milliseconds", "us": "microseconds",
    "ns": "nanoseconds", "By": "bytes", "KiBy": "kibibytes", "MiBy": "mebibytes", "GiBy": "gibibytes",
    "TiBy": "tibibytes", "KBy": "kilobytes", "MBy": "megabytes", "GBy": "gigabytes", "TBy": "terabytes",
    "m": "meters", "V": "volts", "A": "amperes", "J": "joules", "W": "watts", "g": "grams", "Cel": "celsius",
    "Hz": "hertz", "%": "percent", "1": "",
}  # fmt: skip
_PER_UNITS = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week", "mo": "month", "y": "year"}
_NAME_RUNS = re.compile(r"[^a-zA-Z0-9:]+")
_LABEL_RUNS = re.compile(r"[^a-zA-Z0-9]+")
_ANNOTATION = re.compile(r"{.*}")


def metric_name(instrument_name: str) -> str:
    """The Prometheus name of an instrument, before its unit suffix."""
    name = instrument_name.lower()
    if name[:1].isdigit():
        name = "_" + name[1:]
    return _NAME_RUNS.sub("_", name)


def unit_suffix(unit: str) -> str:
    """The suffix an instrument's UCUM unit adds to its name (``""`` for none)."""
    unit = _ANNOTATION.sub("", unit or "")
    if not unit:
        return ""
    if unit in _UNITS:
        return _UNITS[unit]
    if "/" in unit:
        top, _, bottom = unit.partition("/")
        top = _UNITS.get(top, top)
        bottom = _PER_UNITS.get(bottom, bottom)
        unit = f"{top}_per_{bottom}" if top and bottom else top or bottom
    return _NAME_RUNS.sub("_", unit).strip("_")


def label_name(key: str) -> str:
    """The Prometheus label name of an attribute key."""
    if key[:1].isdigit():
        key = "_" + key[1:]
    return _LABEL_RUNS.sub("_", key)


def label_value(value: object) -> str:
    """The Prometheus label value of an attribute value."""
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def scope_labels(name: str, version: str | None, schema_url: str | None, attributes) -> dict[str, str]:
    """The labels every series of a meter carries."""
    labels = {
        "otel_scope_name": name,
        "otel_scope_version": version or "",
        "otel_scope_schema_url": schema_url or "",
    }
    for key, value in (attributes or {}).items():
        labels["otel_scope_" + label_name(key)] = label_value(value)
    return labels
