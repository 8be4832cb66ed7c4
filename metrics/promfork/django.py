"""Django middleware recording HTTP metrics and serving /metrics: the first entry of ``MIDDLEWARE``.

Usage, in settings.py (settings come from the METRICS_* variables; the
project's gunicorn.conf.py ends with ``gunicorn.install(globals())``)::

    MIDDLEWARE = [
        "promfork.django.PrometheusMiddleware",
        ...
    ]

It records the series the Flask extension records, with the same names, labels
and bounds, through the same request path (promfork.http.exchange). ``route``
is the URL pattern Django matched, ``request.resolver_match.route`` (nested
``include()``s joined by Django) with a leading ``/``, for example
``/api/v1/orders/<int:order_id>/``; a ``re_path`` gives its regular expression
(without the leading ``^``); ``unmatched`` when nothing matched (a 404 from the
resolver), so raw paths never become label values.

When a request counts: a response with a body in memory (``HttpResponse``) or a
known length (``FileResponse``) when this middleware hands it back, just before
the server sends it; a ``StreamingHttpResponse`` when its last chunk has been
taken by the server, or earlier at ``request.META["promfork.response_complete"]()``,
which a streaming view calls right before yielding its final chunk. A view that
raises is counted as the 500 Django answers.

/metrics is answered here, before every other middleware of the project (auth,
sessions, CSRF) and the URL resolver run, and is not counted. Works under
Django's WSGI handler and, as a synchronous middleware that Django adapts,
under its ASGI handler (``uvicorn_worker.UvicornWorker``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from django.http import HttpRequest, HttpResponse, HttpResponseBase

from promfork.http.exchange import Exchange
from promfork.http.recorder import RESPONSE_COMPLETE_KEY
from promfork.http.setup import instrument

__all__ = ["RESPONSE_COMPLETE_KEY", "PrometheusMiddleware", "route_template"]


def route_template(request: HttpRequest) -> str | None:
    """The URL pattern Django matched for `request`, with a leading ``/``; None before or without a match."""
    match = getattr(request, "resolver_match", None)
    if match is None or match.route is None:
        return None
    return "/" + str(match.route).removeprefix("^")


class DjangoExchange(Exchange):
    """A request of a Django project: ``router`` is the request, its route the pattern Django matched."""

    __slots__ = ()

    def capture_route(self) -> None:
        route = route_template(self.router)
        if route is not None:
            self.route = route

    def stream(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """`chunks` as the server takes them, measured; the request counts once the last one is taken."""
        try:
            for chunk in chunks:
                self.sent += len(chunk)
                yield chunk
        finally:
            self.finish()


class PrometheusMiddleware:
    """HTTP request metrics for a Django project, plus its /metrics endpoint."""

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase], metrics_path: str = "/metrics") -> None:
        self.get_response = get_response
        self.metrics_path = metrics_path
        parts = instrument()
        self.settings, self.registry, self.recorder = parts.settings, parts.registry, parts.recorder
        self._metrics_app = parts.metrics_app

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        if request.path_info == self.metrics_path:
            return self._serve_metrics(request)
        recorder = self.recorder
        if recorder is None:
            return self.get_response(request)
        exchange = DjangoExchange()
        exchange.router = request
        exchange.begin(request.META, None, recorder)
        try:
            response = self.get_response(request)
        except BaseException:  # Django turns a view's exception into a 500; this is one it let through
            exchange.finish()
            raise
        exchange.status = str(response.status_code)
        exchange.capture_route()
        if response.streaming and not response.has_header("Content-Length"):
            if getattr(response, "is_async", False):
                response.streaming_content = _async_stream(exchange, response.streaming_content)
            else:
                response.streaming_content = exchange.stream(response.streaming_content)
            return response
        if response.streaming:  # a FileResponse of known length
            exchange.sent = int(response["Content-Length"])
        else:
            exchange.sent = len(response.content)
        exchange.finish()  # counted just before the server sends the body
        return response

    def _serve_metrics(self, request: HttpRequest) -> HttpResponse:
        """The exposition, from promfork.reader.exposition's WSGI app, as a Django response."""
        started: list = []

        def start_response(status, headers, exc_info=None):
            started[:] = [status, headers]

        environ = dict(request.META)
        environ.setdefault("QUERY_STRING", request.META.get("QUERY_STRING", ""))
        body = b"".join(self._metrics_app(environ, start_response))
        status, headers = started
        response = HttpResponse(body, status=int(status[:3]))
        for name, value in headers:
            response[name] = value
        return response


async def _async_stream(exchange: DjangoExchange, chunks):
    try:
        async for chunk in chunks:
            exchange.sent += len(chunk)
            yield chunk
    finally:
        exchange.finish()
