"""The /metrics WSGI app: bearer-token auth in front of the exposition.

The aggregated registry (promfork.reader.collector.ExpositionRegistry) is served from
its reader's cached lines, with prometheus-client's format choice (text 0.0.4
by default, OpenMetrics when ``Accept`` asks for it), gzip when accepted and
``name[]`` filtering; any other registry through prometheus-client's
``make_wsgi_app``. This module adds what a production endpoint also needs: optional
``Authorization: Bearer`` checked in constant time, JSON errors, a 503 with
``Retry-After`` instead of a stack trace when the directory stays locked,
``Content-Length``, and HEAD (prometheus-client answers it 405): the headers a
GET would get, without the body.
"""

from __future__ import annotations

import gzip
import hmac
import json
import logging
import os
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import gzip_accepted

from promfork.directory.locks import LockTimeout

log = logging.getLogger("promfork.reader.exposition")

ALLOW = "GET, HEAD, OPTIONS"


def _json_error(start_response, status: str, message: str, extra_headers=()):
    body = json.dumps({"error": {"message": message, "type": "metrics_error", "code": status.split()[0]}}).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *extra_headers]
    start_response(status, headers)
    return [body]


def _with_content_length(app, environ, start_response):
    """Run `app` as a GET, then send its whole body with a Content-Length header."""
    answer = []

    def capture(status, headers, exc_info=None):
        answer[:] = [status, headers]

    chunks = app({**environ, "REQUEST_METHOD": "GET"}, capture)
    try:
        body = b"".join(chunks)
    finally:
        if hasattr(chunks, "close"):
            chunks.close()
    status, headers = answer
    headers = [h for h in headers if h[0].lower() != "content-length"] + [("Content-Length", str(len(body)))]
    start_response(status, headers)
    return [body]


def _cached_exposition_app(registry):
    """A GET-only WSGI app answering from ``registry.exposition`` (what make_wsgi_app does with collect())."""

    def expose(environ, start_response):
        if environ.get("PATH_INFO") == "/favicon.ico":  # as prometheus-client answers browsers
            start_response("200 OK", [])
            return [b""]
        names = parse_qs(environ.get("QUERY_STRING", "")).get("name[]")
        body, content_type = registry.exposition(environ.get("HTTP_ACCEPT"), names)
        headers = [("Content-Type", content_type)]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING")):
            body = gzip.compress(body)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [body]

    return expose


def make_metrics_app(registry: CollectorRegistry, auth_token: str | None = None):
    """Return a WSGI app serving `registry`, requiring `auth_token` as a bearer token when set.

    A registry with an ``exposition(accept, names)`` method (the aggregated one)
    is served from it; any other through prometheus-client's ``make_wsgi_app``.
    """
    expose = _cached_exposition_app(registry) if hasattr(registry, "exposition") else make_wsgi_app(registry)
    expected = f"Bearer {auth_token}".encode() if auth_token else None

    def answer(method: str, environ, start_response):
        if method == "OPTIONS":
            start_response("200 OK", [("Allow", ALLOW), ("Content-Length", "0")])
            return []
        if method not in ("GET", "HEAD"):
            return _json_error(start_response, "405 Method Not Allowed", f"use {ALLOW}", [("Allow", ALLOW)])
        if expected is not None:
            given = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
            if not hmac.compare_digest(given, expected):
                return _json_error(
                    start_response,
                    "401 Unauthorized",
                    "missing or wrong bearer token for /metrics",
                    [("WWW-Authenticate", 'Bearer realm="metrics"')],
                )
        try:
            return _with_content_length(expose, environ, start_response)
        except LockTimeout as exc:
            log.error("promfork: scrape gave up waiting for the metrics lock: %s", exc)
            return _json_error(start_response, "503 Service Unavailable", str(exc), [("Retry-After", "1")])
        except PermissionError as exc:  # a directory or lock this process's user may not use
            log.error("promfork: scrape cannot use the metrics directory: %s", exc)
            message = f"this process (uid {os.geteuid()}) cannot use the metrics directory: {exc}"
            return _json_error(start_response, "503 Service Unavailable", message, [("Retry-After", "10")])

    def metrics_app(environ, start_response):
        method = environ.get("REQUEST_METHOD", "GET")
        body = answer(method, environ, start_response)
        return [] if method == "HEAD" else body

    return metrics_app


def disabled_app(environ, start_response):
    """Answers /metrics when METRICS_ENABLED=false."""
    return _json_error(start_response, "404 Not Found", "metrics are disabled (METRICS_ENABLED=false)")
