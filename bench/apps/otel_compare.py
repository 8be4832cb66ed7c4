"""One Flask app, three ways to take its OpenTelemetry metrics (BENCH_OTEL): promfork, sdk or multiprocess.

``GET /work`` adds 1 to ``jobs`` and records 0.25 in ``job.duration``, with attributes;
``GET /metrics`` shows what the chosen provider shows:
  promfork      promfork.otel.MeterProvider; promfork's aggregated /metrics
  sdk           OpenTelemetry's SDK with its Prometheus exporter (this worker's own state)
  multiprocess  opentelemetry-sdk-extension-prometheus-multiprocess on prometheus-client's files
"""

import os

from flask import Flask, Response

ATTRIBUTES = {"http.route": "/work", "ok": True}


def provider_for(kind: str):
    if kind == "promfork":
        from promfork.otel import MeterProvider

        return MeterProvider()
    if kind == "sdk":
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider

        return MeterProvider(metric_readers=[PrometheusMetricReader()])
    from opentelemetry.sdk.extension.prometheus_multiprocess import PrometheusMeterProvider

    return PrometheusMeterProvider()


def create_app() -> Flask:
    kind = os.environ["BENCH_OTEL"]
    meter = provider_for(kind).get_meter("bench")
    jobs = meter.create_counter("jobs")
    duration = meter.create_histogram("job.duration", unit="s", explicit_bucket_boundaries_advisory=[0.1, 0.5, 1])
    app = Flask(__name__)

    @app.get("/work")
    def work():
        jobs.add(1, ATTRIBUTES)
        duration.record(0.25, ATTRIBUTES)
        return "ok"

    if kind == "promfork":
        from promfork.flask import HttpMetrics

        HttpMetrics().init_app(app)
    else:
        from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        @app.get("/metrics")
        def metrics():
            registry = REGISTRY
            if kind == "multiprocess":
                registry = CollectorRegistry()
                MultiProcessCollector(registry)
            return Response(generate_latest(registry), mimetype="text/plain")

    return app
