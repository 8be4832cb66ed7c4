"""promfork.otel: the OpenTelemetry metrics API in promfork's files, named as OpenTelemetry's own exporter names it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
WORKLOAD = str(HERE / "otel_workload.py")


def exposition(*args: str, **env: str) -> dict:
    """{family: (type, {(sample name, labels without empty values, le as a number): value})} of a workload run."""
    done = subprocess.run(
        [sys.executable, WORKLOAD, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    families = {}
    for family in text_string_to_metric_families(done.stdout):
        samples = {}
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if v != ""}  # an empty label is no label
            if "le" in labels:
                labels["le"] = float(labels["le"])  # "1" (OTel's exporter) and "1.0" (prometheus-client): one bound
            samples[(sample.name, tuple(sorted(labels.items())))] = sample.value
        families[family.name] = (family.type, samples)
    return families


def test_names_types_labels_values_and_buckets_equal_opentelemetrys_own_exporter(tmp_path: Path):
    ours = exposition("promfork", str(tmp_path))
    theirs = exposition("sdk")
    our_target, their_target = ours.pop("target_info"), theirs.pop("target_info")
    assert sorted(ours) == sorted(theirs)
    for name, (kind, samples) in theirs.items():
        assert ours[name][0] == kind, name
        assert ours[name][1] == samples, name
    # target_info: the resource the environment and the app name, as OpenTelemetry's exporter shows it.
    (their_labels,), (our_labels,) = ([dict(k[1]) for k in t[1]] for t in (their_target, our_target))
    for key in ("deployment_environment", "service_name", "telemetry_sdk_language"):
        assert our_labels[key] == their_labels[key], key
    assert our_labels["telemetry_sdk_name"] == "promfork"


CARDINALITY = """
import os, sys
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from promfork.writer import values
assert values.install()
from promfork.otel import MeterProvider
meter = MeterProvider(cardinality_limit=3).get_meter("lib")
events = meter.create_counter("events")
for i in range(10):
    events.add(1, {"user": str(i)})
events.add(1, {"user": "0"})
"""


def test_attribute_sets_past_the_limit_go_to_the_overflow_series(tmp_path: Path):
    subprocess.run([sys.executable, "-c", CARDINALITY, str(tmp_path)], check=True, timeout=60)
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    (family,) = [f for f in registry.collect() if f.name == "events"]
    series = {}
    for sample in family.samples:
        if sample.name == "events_total":
            key = tuple(sorted((k, v) for k, v in sample.labels.items() if k.startswith(("user", "otel_metric"))))
            series[key] = sample.value
    assert series == {(("user", "0"),): 2, (("user", "1"),): 1, (("user", "2"),): 1,
                      (("otel_metric_overflow", "true"),): 7}  # fmt: skip


ENTRY_POINT = """
import os, sys, json
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
os.environ["OTEL_PYTHON_METER_PROVIDER"] = "promfork"
from promfork.writer import values
assert values.install()
from opentelemetry import metrics
provider = metrics.get_meter_provider()
metrics.get_meter("lib").create_counter("loaded").add(1)
print(json.dumps(type(provider).__module__))
"""


def test_otel_python_meter_provider_promfork_loads_it_through_the_api(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, "-c", ENTRY_POINT, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == "promfork.otel.provider"
    assert list(tmp_path.glob("counter_*.db"))


EXEMPLAR = """
import os, sys, json
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from promfork.writer import values
assert values.install()
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from promfork.otel import MeterProvider
from promfork.writer import exemplars
trace.set_tracer_provider(TracerProvider())
histogram = MeterProvider().get_meter("lib").create_histogram("work.duration", unit="s",
                                                               explicit_bucket_boundaries_advisory=[0.1, 1])
with trace.get_tracer("t").start_as_current_span("work") as span:
    histogram.record(0.5, {"job": "a"})
    context = span.get_span_context()
histogram.record(0.05, {"job": "a"})  # no span current: no exemplar
found = exemplars.read_exemplars(sys.argv[1])
print(json.dumps({"trace": format(context.trace_id, "032x"), "found": [[k[0], dict(k[1]), e.labels]
                  for k, e in found.items()]}))
"""


def test_a_measurement_under_a_sampled_span_leaves_its_trace_on_the_bucket(tmp_path: Path):
    done = subprocess.run([sys.executable, "-c", EXEMPLAR, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    ((sample, labels, exemplar),) = out["found"]
    assert sample == "work_duration_seconds_bucket" and labels["le"] == "1.0" and labels["job"] == "a"
    assert exemplar["trace_id"] == out["trace"]


@pytest.mark.parametrize("amount", [float("nan"), float("inf"), -1])
def test_amounts_the_sdk_drops_are_dropped_and_never_raise(tmp_path: Path, amount: float):
    code = f"""
import os, sys
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from promfork.writer import values
assert values.install()
from promfork.otel import MeterProvider
meter = MeterProvider().get_meter("lib")
meter.create_counter("c").add({amount!r})
meter.create_histogram("h").record({amount!r})
meter.create_histogram("h").record(1, {{"le": "reserved by Prometheus"}})  # refused by prometheus-client: dropped
print("ok")
"""
    code = code.replace("nan", "float('nan')").replace("inf", "float('inf')")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
