"""One WSGI request from its start until it is counted: the one place a WSGI request is timed, counted and recorded.

``InstrumentedApp`` wraps a WSGI app; each request gets an ``Exchange`` that
captures the status, measures the body and records the request once. The Flask
extension (promfork.flask), the generic WSGI middleware (promfork.wsgi) and the
Django middleware (promfork.django) differ only in how they find the route
template (``Exchange.capture_route``).

A response is counted when its last byte is handed to the server (known from
Content-Length), when the app calls ``environ[RESPONSE_COMPLETE_KEY]()`` before
its final chunk, or otherwise when the server closes the body. So a client never
receives a whole response that is not counted (a stream that does not call it is
counted only at close(), after its last byte); a worker killed before that point
takes the request with it (the client sees its connection cut). The in-flight
gauge drops in the same update that counts it.

Traces: a request with a sampled W3C ``traceparent`` header (or, when
OpenTelemetry is in use, a sampled span current as it enters the middleware)
has its trace bound for the whole request, streamed body and ``close()``
included (``promfork.trace.current_trace``), and leaves it as the exemplar of
its duration bucket. A request without one pays a dictionary lookup or two.

This runs on every request, so it favours few calls and attribute stores over
shorter code (bench/instructions.py counts it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from time import perf_counter

from promfork import trace as _trace
from promfork.http.recorder import KNOWN_METHODS, RESPONSE_COMPLETE_KEY, UNMATCHED, HttpRecorder
from promfork.trace import REQUEST_TRACE, bind, request_trace, unbind

UNKNOWN_LENGTH = float("inf")  # no Content-Length: counted when the server closes the body
_modules = sys.modules  # "opentelemetry.trace" in it: OpenTelemetry is in use (see promfork.trace)


class Exchange:
    """One request/response: captures the status, measures the body, records once (set up by ``begin``)."""

    __slots__ = (
        "body",
        "environ",
        "length",
        "recorded",
        "recorder",
        "route",
        "router",
        "sent",
        "server_start",
        "started",
        "status",
        "trace",
    )

    def begin(self, environ: dict, start_response: Callable | None, recorder: HttpRecorder) -> None:
        """Start timing: the request is in flight from now, and the app may count it early."""
        self.started = perf_counter()
        self.environ = environ
        self.server_start = start_response
        self.recorder = recorder
        self.body = ()
        self.status = "500"
        self.route = UNMATCHED
        self.length = UNKNOWN_LENGTH
        self.sent = 0
        self.recorded = False
        header = environ.get("HTTP_TRACEPARENT")
        # The last test: a request never closed (a server breaking PEP 3333) left its trace bound.
        if header is not None or "opentelemetry.trace" in _modules or (_trace.traces_seen and REQUEST_TRACE.get()):
            self.trace = trace = request_trace(header)
            bind(trace)
        else:
            self.trace = None
        recorder.in_flight_samples.update(1)
        environ[RESPONSE_COMPLETE_KEY] = self  # calling it records (no bound method to make)

    def start_response(self, status: str, headers: list, exc_info=None):
        self.status = status[:3]
        self.capture_route()  # the framework calls this with its request state still at hand
        for name, value in headers:
            if len(name) == 14 and name.lower() == "content-length":
                try:
                    self.length = int(value)
                except ValueError:
                    self.length = UNKNOWN_LENGTH
        return self.server_start(status, headers, exc_info)

    def __iter__(self) -> Iterator[bytes]:
        length = self.length
        for chunk in self.body:
            self.sent = sent = self.sent + len(chunk)
            if sent >= length:
                self.record()  # before the last byte leaves this process
            yield chunk

    def capture_route(self) -> None:
        """Take the route template, if the framework matched one (``router(environ)``; None: not matched).

        ``router`` is what finds the route: a function of the environ here; a
        subclass may keep something else there (the Flask app's URL map).
        """
        route = self.router(self.environ)
        if route is not None:
            self.route = route

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
            self.finish()

    def finish(self) -> None:
        """Record (if not yet) and let go of the request."""
        if not self.recorded:
            self.record()
        # environ -> self -> environ: break the cycle so the request's
        # objects are freed when the server drops them.
        self.environ.pop(RESPONSE_COMPLETE_KEY, None)
        if self.trace is not None:
            unbind()


class InstrumentedApp:
    """WSGI middleware timing and counting every request of `app` through `exchange` objects."""

    __slots__ = ("app", "exchange", "recorder", "router")

    def __init__(
        self, app: Callable, recorder: HttpRecorder, router: object, exchange: type[Exchange] = Exchange
    ) -> None:
        self.app = app
        self.recorder = recorder
        self.router = router
        self.exchange = exchange

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        exchange = self.exchange()
        exchange.router = self.router
        exchange.begin(environ, start_response, self.recorder)
        try:
            exchange.body = self.app(environ, exchange.start_response)
        except BaseException:
            exchange.status = "500"
            exchange.close()
            raise
        return exchange
