"""Every use of prometheus-client's internals, and the range of its versions they are tested with.

promfork stores values in prometheus-client's own multiprocess files, faster
than its value class does, and so has to know a few things the library does not
publish: which value class it uses (and how to swap it), how a metric child
holds its values and bucket bounds, how a registry lists its collectors, and
how a sample's key is written. All of it is here, nowhere else:

* ``value_class`` / ``use_value_class`` / ``in_multiprocess_mode``: the swap;
* ``values_of(child)``: a counter's, gauge's or histogram's value objects;
* ``histogram_identity(histogram)``: its name, label names and upper bounds;
* ``label_values(child)``: the label values a labelled child was made for;
* ``collectors(registry)``: the registry's collectors in registration order;
* ``sample_key``: the key format of the files (``mmap_key``).

``TESTED`` is the version range these were checked against; pyproject.toml
declares the same range (``tests/test_client.py`` checks both, and that the
installed version is inside it). On a version outside it promfork keeps
prometheus-client's own value class (``supported()`` is False): slower, but it
never writes files in a layout it has not been tested with.

Importing this module imports prometheus_client only inside its functions: a
gunicorn.conf.py may import it before PROMETHEUS_MULTIPROC_DIR is set.
"""

from __future__ import annotations

import logging
import os
from importlib import metadata

log = logging.getLogger(__name__)

TESTED = ((0, 25), (0, 27))  # >=0.25, <0.27 (pyproject.toml: prometheus-client>=0.25,<0.27)


class ImportOrderError(RuntimeError):
    """prometheus-client chose its value class before PROMETHEUS_MULTIPROC_DIR was set."""


def installed_version() -> tuple[int, ...]:
    """The installed prometheus-client's version as numbers (``(0, 26, 0)``)."""
    numbers = []
    for part in metadata.version("prometheus-client").split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers)


def supported() -> bool:
    """True when the installed prometheus-client is in the tested range."""
    low, high = TESTED
    return low <= installed_version()[:2] < high


def value_class():
    """The class prometheus-client stores every metric value through."""
    from prometheus_client import values

    return values.ValueClass


def use_value_class(cls) -> None:
    """Make `cls` prometheus-client's value class (before any metric is created)."""
    from prometheus_client import values

    values.ValueClass = cls


def in_multiprocess_mode() -> bool:
    """True when prometheus-client stores values in per-process files."""
    return bool(getattr(value_class(), "_multiprocess", False))


def ensure_multiprocess_mode() -> None:
    """Refuse to run when prometheus-client's storage mode disagrees with the environment.

    prometheus-client decides once, when first imported, whether values live in
    per-process files (PROMETHEUS_MULTIPROC_DIR set) or in memory. If the variable
    is set only after that import, every worker keeps its numbers to itself and
    /metrics silently shows one worker's share. Failing here turns that silent
    bug into a start-up error.
    """
    in_files = in_multiprocess_mode()
    wanted = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    if wanted and not in_files:
        raise ImportOrderError(
            "prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set, so each worker "
            "would report only its own numbers. Set PROMETHEUS_MULTIPROC_DIR before anything imports "
            "prometheus_client (start with `gunicorn -c gunicorn.conf.py`, which does it first), and do "
            "not import prometheus_client at the top of your gunicorn config."
        )
    if in_files and not wanted:
        raise ImportOrderError(
            "prometheus_client is in multiprocess mode but PROMETHEUS_MULTIPROC_DIR is no longer set; "
            "do not remove it from the environment after start"
        )


def values_of(child) -> tuple[object, tuple[float, ...] | None, tuple[object, ...]] | None:
    """(total, upper bounds, bucket values) of a labelled child; None for anything else.

    A Counter's or Gauge's total is its value object, with no bounds; a
    Histogram's is its sum, with its upper bounds and one value per bucket.
    """
    from prometheus_client import Counter, Gauge, Histogram

    if isinstance(child, Counter | Gauge):
        return getattr(child, "_value", None), None, ()
    if isinstance(child, Histogram):
        bounds = tuple(getattr(child, "_upper_bounds", ()))
        return getattr(child, "_sum", None), bounds, tuple(getattr(child, "_buckets", ()))
    return None


def histogram_identity(histogram) -> tuple[str, tuple[str, ...], tuple[float, ...]]:
    """A histogram's name (without suffix), label names and upper bounds (``+Inf`` last)."""
    return histogram._name, tuple(histogram._labelnames), tuple(histogram._upper_bounds)


def label_values(child) -> tuple[str, ...]:
    """The label values a labelled child was made for (empty for a metric without labels)."""
    return tuple(getattr(child, "_labelvalues", ()))


def collectors(registry) -> list:
    """The registry's collectors, in registration order."""
    return list(registry._collector_to_names)


def sample_key(metric_name: str, name: str, labelnames, labelvalues, help_text: str) -> str:
    """The key of one sample in a multiprocess file, exactly as prometheus-client writes it."""
    from prometheus_client.mmap_dict import mmap_key

    return mmap_key(metric_name, name, labelnames, labelvalues, help_text)


def declared_labels(collector) -> tuple[str, ...] | None:
    """The label names a metric was declared with; None for a collector that is not a metric."""
    labels = getattr(collector, "_labelnames", None)
    return tuple(labels) if labels is not None else None


def gauge_mode(collector) -> str | None:
    """A Gauge's multiprocess mode (``livesum``, ``max``...); None for other collectors."""
    return getattr(collector, "_multiprocess_mode", None)
