"""Helper process for tests/test_values.py: write metrics through one value store, print what happened.

    python tests/value_workload.py DIR STORE SCENARIO

STORE is ``stock`` (prometheus-client's own multiprocess value class) or
``promfork`` (promfork.writer.values.MmapValue, installed before any metric exists).
A fresh interpreter per run: the value class is chosen once per process.
"""

import json
import os
import sys
import threading

directory, store, scenario = sys.argv[1:4]
os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from promfork.writer import values  # noqa: E402 (after the env var, on purpose)

if scenario == "late-install":  # a stock value exists before install() is asked
    from prometheus_client import Counter

    Counter("made_before_total", "Created by the stock class.").inc()
elif store == "promfork":
    assert values.install(), "install() declined in a fresh interpreter"

from prometheus_client import Counter, Gauge, Histogram, Summary  # noqa: E402
from prometheus_client import values as client_values  # noqa: E402

from promfork.writer.values import Samples  # noqa: E402

GAUGE_MODES = ("all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum", "mostrecent", "livemostrecent")
report: dict = {"pid": os.getpid(), "class": client_values.ValueClass.__name__}


def mix() -> None:
    """Every kind and gauge mode, through the public API and through Samples, bounds and NaN included."""
    requests = Counter("requests_total", "Requests.", ["route", "status"])
    latency = Histogram("latency_seconds", "Latency.", ["route"], buckets=(0.05, 0.1, 0.5, 1.0))
    sizes = Summary("sizes_bytes", "Sizes.")
    gauges = {mode: Gauge(f"level_{mode}", "Level.", ["slot"], multiprocess_mode=mode) for mode in GAUGE_MODES}
    rows = Samples(requests.labels("/a", "200"), latency.labels("/a"), gauges["livesum"].labels("0"))
    report["direct"] = rows.direct
    for i in range(2000):
        rows.update(1, (i % 13) / 10, 1)  # 0.0 … 1.2: exact bounds and +Inf included
        rows.update(0, 0.05, -1)
    requests.labels("/b", "500").inc(3)
    for amount in (0.05, 2.5, float("inf"), float("nan")):
        latency.labels("/b").observe(amount)
    Samples(latency.labels("/c")).update(float("nan"))
    sizes.observe(17)
    sizes.observe(0.25)
    for n, (mode, gauge) in enumerate(gauges.items()):
        gauge.labels("1").set(n + 0.5)
        if "mostrecent" not in mode:  # prometheus-client allows only set() there
            gauge.labels("1").inc(2)
            gauge.labels("2").dec(n)


def fork() -> None:
    """A value used before and after a fork: each process writes its own file."""
    jobs = Counter("jobs_total", "Jobs.", ["kind"])
    rows = Samples(jobs.labels("x"))
    rows.update(5)
    jobs.labels("x").inc(1)
    child = os.fork()
    if child == 0:
        rows.update(2)
        jobs.labels("x").inc(3)
        Counter("child_only_total", "Made in the child.").inc(4)
        os._exit(0)
    os.waitpid(child, 0)
    rows.update(1)
    report["child"] = child


def threads() -> None:
    """Eight threads updating the same series through both paths: nothing may be lost."""
    hits = Counter("hits_total", "Hits.", ["route"])
    seconds = Histogram("took_seconds", "Took.", ["route"], buckets=(0.1, 1.0))
    rows = Samples(hits.labels("/t"), seconds.labels("/t"))

    def work() -> None:
        for _ in range(5000):
            rows.update(1, 0.5)
            hits.labels("/t").inc()

    pool = [threading.Thread(target=work) for _ in range(8)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    report["expected_hits"] = 8 * 5000 * 2
    report["expected_observations"] = 8 * 5000


def growth() -> None:
    """Enough series to grow the file past its first 64 KiB, written while it grows."""
    wide = Counter("wide_total", "Many series.", ["n"])
    first = Samples(wide.labels("first"))
    for n in range(1500):
        wide.labels(str(n)).inc(n)
        first.update(1)
    report["series"] = 1500


def nan_bound() -> None:
    """A histogram whose bounds include NaN (prometheus-client accepts it), updated through Samples."""
    odd = Histogram("odd_seconds", "Odd bounds.", buckets=(float("nan"), 1.0))
    rows = Samples(odd)
    for amount in (0.5, 2.0, 7.0):
        rows.update(amount)
    report["direct"] = rows.direct


if scenario == "late-install":
    report["installed"] = values.install()
    report["class"] = client_values.ValueClass.__name__
else:
    {"mix": mix, "fork": fork, "threads": threads, "growth": growth, "nan-bound": nan_bound}[scenario]()
print(json.dumps(report))
