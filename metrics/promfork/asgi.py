"""ASGI middleware recording HTTP metrics and serving /metrics, for FastAPI, Starlette and other ASGI apps.

Usage (one line; settings come from the METRICS_* variables)::

    app = FastAPI()
    app.add_middleware(PrometheusMiddleware)     # or: app = PrometheusMiddleware(app)

It records the series the Flask extension records (``promfork.http.recorder``), with
the same names, labels and bounds. Route labels are the templates of Starlette
routing (``/items/{item_id}``, mounted sub-apps and FastAPI's included routers
included), found with the routes' own ``matches()`` as the router does; a
path no route fully matches (404, 405, a slash redirect) is ``unmatched``.
A request is in flight from its start until it is counted, and the gauge drops
in the same locked update that counts it. It is counted right before the
message ending its response body is handed to the server, so a client never
receives a whole response that is not counted; streaming responses are timed
to that point. A request that ends otherwise (client gone, app raised) is
counted once when the app returns, as 500 if no response had started.

A streaming app can do better than the end-of-body message: Starlette sends
its final chunk and only then an empty closing message. The app calls
``scope["promfork.response_complete"]()`` right before sending its final
chunk to count the request at once (the status sent, the bytes sent so far,
the duration until now); later calls count nothing more. The key is absent
when metrics are disabled: look it up with ``scope.get``. Flask's WSGI environ
carries the same key.

/metrics is answered here, before the app and whatever middleware it adds
inside this one, by promfork.reader.exposition's WSGI app run in a worker thread (a
scrape reads files under a lock: it must not block the event loop). Lifespan
and websocket scopes pass through untouched.

Traces: a request with a sampled W3C ``traceparent`` header (or, when
OpenTelemetry is in use, a sampled span current as it enters this middleware)
has its trace bound for the request's task (``promfork.trace.current_trace``,
copied into threads the app runs sync code in) and leaves it as the exemplar of
its duration bucket (promfork.writer.exemplars). The header is found in the same pass
over the headers that finds Content-Length.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from time import perf_counter
from typing import Any

try:
    import anyio.to_thread
    from starlette.routing import Match
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(f"promfork.asgi needs Starlette ({exc}); install it with: pip install 'promfork[asgi]'") from exc

from promfork.config import Settings
from promfork.http.recorder import KNOWN_METHODS, OTHER_METHOD, RESPONSE_COMPLETE_KEY, UNMATCHED, HttpRecorder
from promfork.http.setup import instrument
from promfork.trace import bind, request_trace, unbind

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

__all__ = ["RESPONSE_COMPLETE_KEY", "PrometheusMiddleware", "route_template"]

_STATUS = {code: str(code) for code in range(100, 600)}
_modules = sys.modules  # "opentelemetry.trace" in it: OpenTelemetry is in use (see promfork.trace)


class PrometheusMiddleware:
    """HTTP request metrics for one ASGI app, plus its /metrics endpoint.

    `settings` defaults to the METRICS_* environment (``promfork.config``). In
    multiprocess mode (PROMETHEUS_MULTIPROC_DIR set, as under a gunicorn.conf.py
    calling ``promfork.gunicorn.install``) /metrics aggregates every
    worker; otherwise the app gets a private in-memory registry, ``registry``.
    Add it last (outermost) so that /metrics is served outside any auth or other
    middleware of the app.
    """

    def __init__(self, app: ASGIApp, *, settings: Settings | None = None, metrics_path: str = "/metrics") -> None:
        if not metrics_path.startswith("/"):
            raise ValueError(f"metrics_path={metrics_path!r} must start with '/'")
        self.app = app
        self._routing = _routing_of(app)
        self.metrics_path = metrics_path.rstrip("/") or "/"
        parts = instrument(settings)
        self.settings, self.registry, self.recorder = parts.settings, parts.registry, parts.recorder
        self._metrics_app: Callable = parts.metrics_app
        self._threaded = parts.recorder is not None  # a scrape reads files under a lock: off the event loop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = _route_path(scope)
        metrics_path = self.metrics_path
        if path.startswith(metrics_path) and (len(path) == len(metrics_path) or path[len(metrics_path)] == "/"):
            await self._serve_metrics(scope, send, path[len(metrics_path) :])
            return
        recorder = self.recorder
        if recorder is None:
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(scope, send, recorder)
        scope = dict(scope)  # a copy: this request's additions never reach the server's scope
        exchange.route = self._route(scope)
        scope[RESPONSE_COMPLETE_KEY] = exchange.record
        # Each request runs in a task of its own, whose context starts without a trace.
        if exchange.traceparent is not None or "opentelemetry.trace" in _modules:
            exchange.trace = trace = request_trace(exchange.traceparent)
            bind(trace)
        try:
            await self.app(scope, receive, exchange.send)
        finally:
            exchange.record()
            if exchange.trace is not None:
                unbind()

    def _route(self, scope: Scope) -> str:
        # Read on every request: routes may be added after the middleware.
        routes = getattr(self._routing or scope.get("app"), "routes", None)
        try:
            return (routes and route_template(routes, scope)) or UNMATCHED
        except Exception:  # a route class of the app's own that cannot match here: metrics never fail a request
            return UNMATCHED

    async def _serve_metrics(self, scope: Scope, send: Send, path_info: str) -> None:
        environ = _wsgi_environ(scope, self.metrics_path, path_info)
        if self._threaded:
            status, headers, body = await anyio.to_thread.run_sync(_call_wsgi, self._metrics_app, environ)
        else:
            status, headers, body = _call_wsgi(self._metrics_app, environ)
        await send(
            {
                "type": "http.response.start",
                "status": int(status[:3]),
                "headers": [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _routing_of(app: Any) -> Any:
    """The app or router whose ``routes`` decide where `app` sends a request, or None.

    Wrapped around a Starlette or FastAPI app, that is the app; added with
    ``add_middleware`` (or around other middleware), the router at the end of the
    chain of ``.app`` attributes that ASGI middleware conventionally keep. Without
    one, the app Starlette puts in the scope is asked at request time.
    """
    for _ in range(32):  # a middleware chain, not a cycle
        if app is None or hasattr(app, "routes"):
            return app
        app = getattr(app, "app", None)
    return None


def route_template(routes: Sequence[Any], scope: Scope) -> str | None:
    """The template of the route Starlette routing picks for `scope` (the first full match), or None.

    Mounted apps contribute their prefix and their own routes' templates; a
    mounted app without routes (static files, a WSGI app) is ``<prefix>/{path}``.
    """
    return _template(routes, scope, "", expand=True)


def _template(routes: Sequence[Any], scope: Scope, prefix: str, expand: bool) -> str | None:
    for route in routes:
        match, child_scope = route.matches(scope)
        if match is not Match.FULL:
            continue
        path = getattr(route, "path", None)
        inner = getattr(route, "routes", None)  # Mount and Host have routes
        if path is None and inner is None:
            # FastAPI's included routers match as one route; their routes carry their prefixed templates.
            return _template(_included_routes(route), scope, prefix, expand=False) if expand else None
        if inner is None:
            return prefix + path
        prefix += path or ""  # a Host adds no path
        if not inner:
            return prefix + "/{path}"
        return _template(inner, {**scope, **child_scope}, prefix, expand=True)
    return None


def _included_routes(route: Any) -> list:
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # no FastAPI, or one that flattens included routers into app.routes
        return []
    return list(iter_route_contexts([route]))


def _route_path(scope: Scope) -> str:
    """The path below the app's root_path (what routing matches)."""
    path = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :]
    return path


class _Exchange:
    """One request/response: captures the status, measures the body, records once."""

    __slots__ = (
        "method",
        "once",
        "recorder",
        "request_bytes",
        "route",
        "sent",
        "server_send",
        "started",
        "status",
        "trace",
        "traceparent",
    )

    def __init__(self, scope: Scope, server_send: Send, recorder: HttpRecorder) -> None:
        self.started = perf_counter()
        self.server_send = server_send
        self.recorder = recorder
        self.route = UNMATCHED  # until the routes are matched
        method = scope["method"]
        self.method = method if method in KNOWN_METHODS else OTHER_METHOD
        self.request_bytes, self.traceparent = _request_headers(scope["headers"])
        self.trace = None  # set by the middleware when the request carries one
        self.status = "500"  # until a response starts
        self.sent = 0
        # record() may be called from the app's thread (a sync generator) while the loop ends the
        # request: a lock taken once and never released makes "count once" atomic.
        self.once = threading.Lock()
        recorder.in_flight_samples.update(1)

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            self.sent += len(message.get("body", b""))
            if not message.get("more_body", False):
                self.record()  # before the last byte leaves this process
        elif kind == "http.response.start":
            status = message["status"]
            self.status = _STATUS.get(status) or str(status)
        elif kind == "http.response.pathsend":  # the whole body in one message: a file the server sends
            self.sent += _file_size(message.get("path"))
            self.record()
        await self.server_send(message)

    def record(self) -> None:
        """Count the request now, once: later calls do nothing."""
        if not self.once.acquire(blocking=False):
            return
        seconds = perf_counter() - self.started
        recorder = self.recorder
        key = (self.method, self.route, self.status)
        series = recorder.bound.get(key) or recorder.series(*key)
        series.update(1, seconds, self.request_bytes, self.sent, -1)  # counted, so no longer in flight
        if self.trace is not None:
            recorder.record_exemplar(self.method, self.route, seconds, self.trace)


def _request_headers(headers: Sequence[tuple[bytes, bytes]]) -> tuple[int, str | None]:
    """Content-Length (0 when absent or invalid) and the ``traceparent`` value (None when absent or repeated)."""
    length = None
    traceparent = None
    for name, value in headers:
        size = len(name)
        if size == 14 and length is None and name.lower() == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = 0
        elif size == 11 and name.lower() == b"traceparent":
            # Sent twice, it is invalid (W3C); the joined value fails parsing, as under WSGI.
            decoded = value.decode("latin-1")
            traceparent = decoded if traceparent is None else f"{traceparent},{decoded}"
    return length or 0, traceparent


def _file_size(path: Any) -> int:
    try:
        return os.stat(path).st_size
    except (OSError, TypeError, ValueError):
        return 0


def _wsgi_environ(scope: Scope, script_name: str, path_info: str) -> dict[str, Any]:
    """The WSGI environ of a /metrics request: method, path, query and headers (its body is never read)."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": scope.get("root_path", "") + script_name,
        "PATH_INFO": path_info,
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "wsgi.url_scheme": scope.get("scheme", "http"),
    }
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").upper().replace("-", "_")
        if name not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            name = "HTTP_" + name
        value = raw_value.decode("latin-1")
        environ[name] = f"{environ[name]},{value}" if name in environ else value
    return environ


def _call_wsgi(app: Callable, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
    """Run a WSGI app to completion: its status, headers and whole body."""
    answer: list = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info=None) -> None:
        answer[:] = [status, headers]

    chunks = app(environ, start_response)
    try:
        body = b"".join(chunks)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    return answer[0], answer[1], body
