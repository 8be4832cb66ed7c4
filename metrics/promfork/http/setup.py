"""What every framework adapter sets up once per app: settings, the recorder and the /metrics app.

``instrument(settings)`` checks prometheus-client's storage mode (a start-up
error if it was imported before PROMETHEUS_MULTIPROC_DIR was set), then gives
the adapter what it serves with: in multiprocess mode (under a gunicorn.conf.py
that calls ``promfork.gunicorn.install``) a recorder whose metrics live in the
files and a /metrics app aggregating every worker's; otherwise a private
in-memory registry. With ``METRICS_ENABLED=false`` there is no recorder and
/metrics answers 404.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from promfork.client import ensure_multiprocess_mode
from promfork.config import Settings, load_settings
from promfork.http.recorder import HttpRecorder
from promfork.reader.exposition import disabled_app, make_metrics_app

# One recorder per namespace and process in multiprocess mode: every app of a process
# shares its metric objects (the value store would count each update once anyway).
_shared: dict[str, HttpRecorder] = {}


@dataclass
class Instrumentation:
    """An adapter's working parts."""

    settings: Settings
    recorder: HttpRecorder | None  # None when metrics are disabled
    metrics_app: Callable  # the WSGI app serving /metrics
    registry: CollectorRegistry | None  # the private registry outside multiprocess mode, else None


def instrument(settings: Settings | None = None) -> Instrumentation:
    """Settings (from METRICS_* unless given), the recorder and the /metrics app for one adapter."""
    settings = settings or load_settings()
    if not settings.enabled:
        return Instrumentation(settings, None, disabled_app, None)
    ensure_multiprocess_mode()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from promfork.reader.collector import exposition_registry

        recorder = _shared.get(settings.namespace)
        if recorder is None:
            recorder = _shared[settings.namespace] = HttpRecorder(settings, None)
        return Instrumentation(
            settings, recorder, make_metrics_app(exposition_registry(settings), settings.auth_token), None
        )
    registry = CollectorRegistry()
    return Instrumentation(
        settings, HttpRecorder(settings, registry), make_metrics_app(registry, settings.auth_token), registry
    )
