"""Flask extension recording HTTP metrics and serving /metrics (``init_app`` style).

Usage::

    http_metrics = HttpMetrics()
    def create_app():
        app = Flask(__name__)
        http_metrics.init_app(app)
        return app

Requests are timed, counted and recorded by promfork.http.exchange (a WSGI
middleware around ``app.wsgi_app``, so a streamed response is timed and sized
until its last byte; ``environ["promfork.response_complete"]()`` counts a stream
at its final chunk). Route labels are Flask rule templates, never raw paths;
unmatched paths share the label value ``unmatched`` and unknown methods become
``other``, so hostile traffic cannot grow the number of series. /metrics itself
is served outside the instrumented app and outside any auth the app applies to
its own routes. Traces: put OpenTelemetry's WSGI middleware outside this one, so
its span is current when a request enters promfork's.
"""

from __future__ import annotations

from flask import Flask, got_request_exception, request
from prometheus_client import CollectorRegistry
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from promfork.config import Settings
from promfork.http.exchange import Exchange, InstrumentedApp
from promfork.http.recorder import RESPONSE_COMPLETE_KEY
from promfork.http.setup import instrument

_REQUEST_KEY = "werkzeug.request"  # where Flask's request object (with its matched url_rule) is found


class HttpMetrics:
    """HTTP request metrics for one Flask app, plus its /metrics endpoint."""

    def __init__(self, app: Flask | None = None, *, metrics_path: str = "/metrics") -> None:
        self.metrics_path = metrics_path
        self.settings: Settings | None = None
        self.registry: CollectorRegistry | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, settings: Settings | None = None) -> None:
        """Instrument `app` and mount the exposition at `metrics_path`.

        Multiprocess mode (PROMETHEUS_MULTIPROC_DIR set, as under gunicorn.conf.py)
        aggregates all workers; otherwise the app gets a private in-memory registry.
        """
        parts = instrument(settings)
        self.settings, self.registry = parts.settings, parts.registry
        app.extensions["promfork"] = self
        wrapped = app.wsgi_app
        if parts.recorder is not None:
            wrapped = InstrumentedApp(app.wsgi_app, parts.recorder, app.url_map, FlaskExchange)
            # An exception that escapes Flask (PROPAGATE_EXCEPTIONS) never reaches start_response:
            # its route is taken while Flask reports it, with the request context still pushed.
            got_request_exception.connect(_route_of_failed_request, app, weak=False)
        app.wsgi_app = DispatcherMiddleware(wrapped, {self.metrics_path: parts.metrics_app})


class FlaskExchange(Exchange):
    """A request of a Flask app: its route is the template of the rule Flask matched.

    That is ``url_rule`` of the request object Flask keeps in the environ
    (``werkzeug.request``) while its request context is pushed (popping it sets
    the key to None), read when Flask starts the response, when the app counts a
    stream early, or when Flask reports an exception that will escape it. Only a
    rule of this app's URL map (``router``) counts: a request served by another
    app mounted inside this one, or a request object of a layer outside it,
    leaves the route ``unmatched``.
    """

    __slots__ = ()

    def capture_route(self) -> None:
        try:
            rule = self.environ[_REQUEST_KEY].url_rule
        except (KeyError, AttributeError):  # no request, not a Flask one, or its context popped
            return
        if rule is not None and rule.map is self.router:
            self.route = rule.rule


def _route_of_failed_request(sender: Flask, **_extra) -> None:
    """got_request_exception receiver: the failing request keeps its route even if no response follows."""
    exchange = request.environ.get(RESPONSE_COMPLETE_KEY)
    if type(exchange) is FlaskExchange:
        exchange.capture_route()
