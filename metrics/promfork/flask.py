"""Flask extension recording HTTP metrics and serving /metrics (``init_app`` style).

Usage::

    http_metrics = HttpMetrics()
    def create_app():
        app = Flask(__name__)
        http_metrics.init_app(app)
        return app

Measurement happens in a WSGI middleware around ``app.wsgi_app`` so that a
streamed response is timed and sized until its last byte. A request is in
flight from its start until it is counted; the gauge drops in the same locked
update that counts it. Route
labels are Flask rule templates, never raw paths; unmatched paths share the
label value ``unmatched`` and unknown methods become ``other``, so hostile
traffic cannot grow the number of series. /metrics itself is served outside the
instrumented app and outside any auth the app applies to its own routes.

A streaming response has no length, so the middleware cannot tell which chunk
is the last; the app can. ``environ["promfork.response_complete"]`` (the key is
``RESPONSE_COMPLETE_KEY``) is a callable that counts the request at once: the
status sent, the bytes sent so far, the duration until now. A streaming app
calls it right before yielding its final chunk, so a client that received the
whole stream always finds it counted, even if the worker is killed before the
server closes the body. Calling it again, and close() afterwards, count nothing
more. The key is absent when the app runs without promfork (or with metrics
disabled): look it up with ``environ.get``. The ASGI middleware puts the same
key in the ASGI scope.

Traces: a request with a sampled W3C ``traceparent`` header (or, when
OpenTelemetry is in use, a sampled span current as it enters this middleware:
put OpenTelemetry's WSGI middleware outside this one) has its trace bound for
the whole request, streamed body and ``close()`` included
(``promfork.trace.current_trace``), and leaves it as the exemplar of its
duration bucket (promfork.writer.exemplars). A request without one pays a dictionary
lookup or two.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from time import perf_counter

from flask import Flask, got_request_exception, request
from prometheus_client import CollectorRegistry
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from promfork import trace as _trace
from promfork.client import ensure_multiprocess_mode
from promfork.config import Settings, load_settings
from promfork.http.recorder import KNOWN_METHODS, RESPONSE_COMPLETE_KEY, UNMATCHED, HttpRecorder
from promfork.reader.exposition import disabled_app, make_metrics_app
from promfork.trace import REQUEST_TRACE, bind, request_trace, unbind

_REQUEST_KEY = "werkzeug.request"  # where Flask's request object (with its matched url_rule) is found
_UNKNOWN_LENGTH = float("inf")  # no Content-Length: counted when the server closes the body
_modules = sys.modules  # "opentelemetry.trace" in it: OpenTelemetry is in use (see promfork.trace)


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
        settings = settings or load_settings()
        self.settings = settings
        app.extensions["promfork"] = self
        if not settings.enabled:
            app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {self.metrics_path: disabled_app})
            return
        ensure_multiprocess_mode()
        multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        # Metrics in multiprocess mode live in files, not in any registry.
        self.registry = None if multiprocess else CollectorRegistry()
        if multiprocess:
            from promfork.reader.collector import exposition_registry

            exposed = exposition_registry(settings)
        else:
            exposed = self.registry
        recorder = HttpRecorder(settings, self.registry)
        instrumented = _InstrumentedApp(app.wsgi_app, recorder, app.url_map)
        # An exception that escapes Flask (PROPAGATE_EXCEPTIONS) never reaches start_response:
        # its route is taken while Flask reports it, with the request context still pushed.
        got_request_exception.connect(_route_of_failed_request, app, weak=False)
        app.wsgi_app = DispatcherMiddleware(
            instrumented, {self.metrics_path: make_metrics_app(exposed, settings.auth_token)}
        )


class _InstrumentedApp:
    """WSGI middleware timing and counting every request.

    A response is counted when its last byte is handed to the server (known from
    Content-Length), when the app calls ``environ[RESPONSE_COMPLETE_KEY]()``
    before its final chunk, or otherwise when the server closes the body. So a
    client never receives a whole response that is not counted (a stream that
    does not call it is counted only at close(), after its last byte); a worker
    killed before that point takes the request with it (the client sees its
    connection cut). The in-flight gauge drops in the same update that counts it.

    The route is the template of the rule Flask matched: ``url_rule`` of the
    request object Flask keeps in the environ (``werkzeug.request``) while its
    request context is pushed (popping it sets the key to None), read when Flask
    starts the response, when the app counts a stream early, or when Flask
    reports an exception that will escape it. Only a rule of this app's URL map
    counts: a request served by another app mounted inside this one, or a
    request object of a layer outside it, leaves the route ``unmatched``. This
    runs on every request, so it favours few calls and attribute stores over
    shorter code (bench/instructions.py counts it).
    """

    __slots__ = ("app", "recorder", "url_map")

    def __init__(self, app: Callable, recorder: HttpRecorder, url_map: object) -> None:
        self.app = app
        self.recorder = recorder
        self.url_map = url_map

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        exchange = _Exchange()
        exchange.started = perf_counter()
        exchange.environ = environ
        exchange.server_start = start_response
        exchange.recorder = recorder = self.recorder
        exchange.body = ()
        exchange.status = "500"
        exchange.route = UNMATCHED
        exchange.length = _UNKNOWN_LENGTH
        exchange.sent = 0
        exchange.recorded = False
        exchange.url_map = self.url_map
        header = environ.get("HTTP_TRACEPARENT")
        # The last test: a request never closed (a server breaking PEP 3333) left its trace bound.
        if header is not None or "opentelemetry.trace" in _modules or (_trace.traces_seen and REQUEST_TRACE.get()):
            exchange.trace = trace = request_trace(header)
            bind(trace)
        else:
            exchange.trace = None
        recorder.in_flight_samples.update(1)
        environ[RESPONSE_COMPLETE_KEY] = exchange  # calling it records (no bound method to make)
        try:
            exchange.body = self.app(environ, exchange.start_response)
        except BaseException:
            exchange.status = "500"
            exchange.close()
            raise
        return exchange


class _Exchange:
    """One request/response: captures the status, measures the body, records once (set up by _InstrumentedApp)."""

    __slots__ = (
        "body",
        "environ",
        "length",
        "recorded",
        "recorder",
        "route",
        "sent",
        "server_start",
        "started",
        "status",
        "trace",
        "url_map",
    )

    def start_response(self, status: str, headers: list, exc_info=None):
        self.status = status[:3]
        self.capture_route()  # Flask calls this with its request context still pushed
        for name, value in headers:
            if len(name) == 14 and name.lower() == "content-length":
                try:
                    self.length = int(value)
                except ValueError:
                    self.length = _UNKNOWN_LENGTH
        return self.server_start(status, headers, exc_info)

    def __iter__(self) -> Iterator[bytes]:
        length = self.length
        for chunk in self.body:
            self.sent = sent = self.sent + len(chunk)
            if sent >= length:
                self.record()  # before the last byte leaves this process
            yield chunk

    def capture_route(self) -> None:
        """Take the route from the request in the environ, if Flask matched one of this app's rules."""
        try:
            rule = self.environ[_REQUEST_KEY].url_rule
        except (KeyError, AttributeError):  # no request, not a Flask one, or its context popped
            return
        if rule is not None and rule.map is self.url_map:
            self.route = rule.rule

    def record(self) -> None:
        """Count the request now, once: later calls (the app's, close()'s) do nothing."""
        if self.recorded:
            return
        self.recorded = True
        if self.route is UNMATCHED:  # counted before the response started: inside the view, maybe
            self.capture_route()
        seconds = perf_counter() - self.started
        environ = self.environ
        method = environ.get("REQUEST_METHOD", "")
        if method not in KNOWN_METHODS:
            method = "other"
        try:
            request_bytes = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            request_bytes = 0
        route = self.route
        recorder = self.recorder
        status = self.status
        series = recorder.bound.get((method, route, status)) or recorder.series(method, route, status)
        series.update(1, seconds, request_bytes, self.sent, -1)  # counted, so no longer in flight
        if self.trace is not None:
            recorder.record_exemplar(method, route, seconds, self.trace)

    __call__ = record  # environ[RESPONSE_COMPLETE_KEY]()

    def close(self) -> None:
        try:
            try:
                close = self.body.close
            except AttributeError:
                pass
            else:
                close()
        finally:
            if not self.recorded:
                self.record()
            # environ -> self -> environ: break the cycle so the request's
            # objects are freed when the server drops them.
            self.environ.pop(RESPONSE_COMPLETE_KEY, None)
            if self.trace is not None:
                unbind()


def _route_of_failed_request(sender: Flask, **_extra) -> None:
    """got_request_exception receiver: the failing request keeps its route even if no response follows."""
    exchange = request.environ.get(RESPONSE_COMPLETE_KEY)
    if type(exchange) is _Exchange:
        exchange.capture_route()
