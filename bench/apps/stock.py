"""The recipe most teams copy from prometheus-client's multiprocess docs: before/after_request
hooks, labels from request.path, a MultiProcessCollector per scrape, mark_process_dead on exit."""

import time

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess

from bench.apps.plain import create_app as create_plain

REQUESTS = Counter("http_requests_total", "Requests.", ["method", "endpoint", "status"])
LATENCY = Histogram("http_request_duration_seconds", "Latency.", ["method", "endpoint"])


def create_app() -> Flask:
    app = create_plain()

    @app.before_request
    def start_timer():
        g.start = time.perf_counter()

    @app.after_request
    def record(response):
        REQUESTS.labels(request.method, request.path, response.status_code).inc()
        LATENCY.labels(request.method, request.path).observe(time.perf_counter() - g.start)
        return response

    @app.get("/metrics")
    def metrics():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)

    return app
