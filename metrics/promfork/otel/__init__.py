"""OpenTelemetry metrics through promfork: ``set_meter_provider(promfork.otel.MeterProvider())``.

provider: the MeterProvider and its meters (and where observable callbacks run);
instruments: what each instrument kind becomes and how workers add up;
naming: the names, labels and buckets OpenTelemetry's Prometheus exporter gives.
"""

from promfork.otel.provider import MeterProvider

__all__ = ["MeterProvider"]
