"""WSGI middleware recording HTTP metrics and serving /metrics, for any WSGI framework (Falcon, Pyramid, Bottle ...).

Usage: give it the app and a function that names the route template a request
was matched to (called with the WSGI environ once the app has started its
response; None when nothing matched, counted as ``unmatched``)::

    from promfork.wsgi import PrometheusMiddleware

    application = PrometheusMiddleware(application, route=lambda environ: environ.get("myframework.route"))

It records the series the Flask and Django adapters record, with the same names,
labels and bounds, through the same request path (promfork.http.exchange):
timed and sized to the last byte of the body, counted before the last byte
leaves, ``environ["promfork.response_complete"]()`` for streams. Route labels
must be templates, never raw paths: a raw path per label value lets any client
grow the number of series without bound. /metrics is answered before the app.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry

from promfork.config import Settings
from promfork.http.exchange import InstrumentedApp
from promfork.http.recorder import RESPONSE_COMPLETE_KEY, UNMATCHED
from promfork.http.setup import instrument

__all__ = ["RESPONSE_COMPLETE_KEY", "UNMATCHED", "PrometheusMiddleware"]


class PrometheusMiddleware:
    """HTTP request metrics for one WSGI app, plus its /metrics endpoint.

    `route(environ)` returns the template of the matched route (``/items/{id}``)
    or None. `settings` defaults to the METRICS_* environment; in multiprocess
    mode (under a gunicorn.conf.py that calls ``promfork.gunicorn.install``)
    /metrics aggregates every worker, otherwise the app gets a private in-memory
    registry, ``registry``.
    """

    def __init__(
        self,
        app: Callable,
        route: Callable[[dict], str | None],
        *,
        settings: Settings | None = None,
        metrics_path: str = "/metrics",
    ) -> None:
        if not callable(route):
            raise TypeError(f"route must be a function of the WSGI environ returning a template, not {route!r}")
        if not metrics_path.startswith("/"):
            raise ValueError(f"metrics_path={metrics_path!r} must start with '/'")
        parts = instrument(settings)
        self.settings: Settings = parts.settings
        self.registry: CollectorRegistry | None = parts.registry
        self.metrics_path = metrics_path
        self._metrics_app = parts.metrics_app
        self._app = app if parts.recorder is None else InstrumentedApp(app, parts.recorder, route)

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == self.metrics_path:
            return self._metrics_app(environ, start_response)
        return self._app(environ, start_response)
