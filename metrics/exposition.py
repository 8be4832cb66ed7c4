"""The /metrics WSGI app: bearer-token auth in front of prometheus-client's exposition.

prometheus-client's ``make_wsgi_app`` does the format work (text 0.0.4 by
default, OpenMetrics when ``Accept`` asks for it, gzip when accepted, ``name[]``
filtering); this module adds what a production endpoint also needs: optional
``Authorization: Bearer`` checked in constant time, JSON errors, and a 503 with
``Retry-After`` instead of a stack trace when the directory stays locked.
"""

from __future__ import annotations

import hmac
import json
import logging

from prometheus_client import CollectorRegistry, make_wsgi_app

from metrics.multiproc import LockTimeout

log = logging.getLogger("promfork.exposition")


def _json_error(start_response, status: str, message: str, extra_headers=()):
    body = json.dumps({"error": {"message": message, "type": "metrics_error", "code": status.split()[0]}}).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *extra_headers]
    start_response(status, headers)
    return [body]


def make_metrics_app(registry: CollectorRegistry, auth_token: str | None = None):
    """Return a WSGI app serving `registry`, requiring `auth_token` as a bearer token when set."""
    expose = make_wsgi_app(registry)
    expected = f"Bearer {auth_token}".encode() if auth_token else None

    def metrics_app(environ, start_response):
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return _json_error(start_response, "405 Method Not Allowed", "use GET", [("Allow", "GET, HEAD")])
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
            return expose(environ, start_response)
        except LockTimeout as exc:
            log.error("promfork: scrape gave up waiting for the metrics lock: %s", exc)
            return _json_error(start_response, "503 Service Unavailable", str(exc), [("Retry-After", "1")])

    return metrics_app


def disabled_app(environ, start_response):
    """Answers /metrics when METRICS_ENABLED=false."""
    return _json_error(start_response, "404 Not Found", "metrics are disabled (METRICS_ENABLED=false)")
