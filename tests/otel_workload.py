"""Helper process for tests/test_otel.py: record one set of OpenTelemetry instruments, print the exposition.

    python otel_workload.py promfork <dir>   through promfork.otel.MeterProvider into <dir>, read back by
                                             prometheus-client's own MultiProcessCollector
    python otel_workload.py sdk              through OpenTelemetry's SDK and its Prometheus exporter

Both print prometheus-client's text exposition of what was recorded.
"""

from __future__ import annotations

import os
import sys

from opentelemetry.metrics import CallbackOptions, Observation


def record(provider) -> None:
    """The same measurements, whichever provider takes them."""
    meter = provider.get_meter("my.lib", "1.2", "https://example.com/schema", attributes={"lib.kind": "demo"})
    requests = meter.create_counter("http.server.request.count", unit="{request}", description="Counts requests")
    attributes = {"http.request.method": "GET", "b": True, "i": 7, "f": 1.5, "l": ["a", "b"], "s": "str-val"}
    for _ in range(3):
        requests.add(1, attributes)
    requests.add(1, {"s": "other"})
    requests.add(-1, {"s": "other"})  # negative on a counter: dropped by both
    active = meter.create_up_down_counter("http.server.active_requests", unit="{request}")
    active.add(3, {"s": "x"})
    active.add(-1, {"s": "x"})
    duration = meter.create_histogram(
        "gen_ai.client.operation.duration", unit="s", description="GenAI operation duration",
        explicit_bucket_boundaries_advisory=[0.01, 0.02, 1, 5],
    )  # fmt: skip
    for value in (0.005, 0.01, 0.5, 3, 10):
        duration.record(value, {"gen_ai.operation.name": "chat"})
    millis = meter.create_histogram("http.client.duration", unit="ms")
    for value in (7, 30000, 0):
        millis.record(value, {"ok": False})
    size = meter.create_counter("bytes.sent", unit="By")
    size.add(10)
    rate = meter.create_counter("pkt.rate", unit="m/s")
    rate.add(2.5)
    temperature = meter.create_gauge("room.temperature", unit="Cel")
    temperature.set(21, {"room": "a"})
    temperature.set(22, {"room": "a"})

    def cpu(options: CallbackOptions):
        return [Observation(100, {"cpu": 0}), Observation(5, {"cpu": 0}), Observation(7, {"cpu": 1})]

    meter.create_observable_counter("system.cpu.time", callbacks=[cpu], unit="s")
    meter.create_observable_up_down_counter("queue.size", callbacks=[lambda o: [Observation(-4, {"q": "a"})]])
    meter.create_observable_gauge(
        "process.memory.usage", callbacks=[lambda o: [Observation(42, {"kind": "x"})]], unit="By"
    )
    other = provider.get_meter("other.lib")
    other.create_counter("other.events").add(2, {"k": "v"})


def main() -> None:
    if sys.argv[1] == "promfork":
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[2]
        from promfork.writer import values

        assert values.install()
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        from promfork.otel import MeterProvider

        record(MeterProvider(resource={"deployment.environment": "dev"}))
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=sys.argv[2])
    else:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.resources import Resource
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry()
        reader = PrometheusMetricReader(registry=registry)
        resource = Resource.create({"deployment.environment": "dev"})
        record(MeterProvider(metric_readers=[reader], resource=resource))
    sys.stdout.write(generate_latest(registry).decode())


if __name__ == "__main__":
    main()
