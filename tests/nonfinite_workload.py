"""Helper process: fork one short-lived writer per column of PLAN; each writes its inf, -inf or nan, then exits.

Run as `python tests/nonfinite_workload.py DIR` with prometheus_client in
multiprocess mode (the stock value store). Prints the writers' pids, one a line.
"""

import os
import sys
import time

directory = sys.argv[1]
os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory

from prometheus_client import Counter, Gauge, Histogram, Summary  # noqa: E402 (after the env var, on purpose)

INF, NAN = float("inf"), float("nan")
GAUGE_MODES = ("all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum", "mostrecent", "livemostrecent")
# series label -> what the first and the second process write. Counters cannot go negative.
COUNTER_PLAN = {"inf": (INF, 1.0), "nan": (NAN, 1.0), "inf_nan": (INF, NAN), "overflow": (1e308, 1e308)}
PLAN = {
    "inf_and_minus_inf": (INF, -INF),
    "inf": (0.5, INF),
    "minus_inf": (-INF, 0.5),
    "nan_first": (NAN, 1.0),
    "nan_second": (1.0, NAN),
    "nan_both": (NAN, NAN),
    "overflow": (1e308, 1e308),
}

counter = Counter("events_total", "Events.", ["case"])
histogram = Histogram("latency_seconds", "Latency.", ["case"], buckets=(0.0, 1.0))
summary = Summary("size_bytes", "Sizes.", ["case"])
gauges = {mode: Gauge(f"level_{mode}", "Level.", ["case"], multiprocess_mode=mode) for mode in GAUGE_MODES}

for column in range(2):
    pid = os.fork()
    if pid == 0:
        for case, values in COUNTER_PLAN.items():
            counter.labels(case).inc(values[column])
        for case, values in PLAN.items():
            histogram.labels(case).observe(values[column])
            summary.labels(case).observe(values[column])
            for gauge in gauges.values():
                gauge.labels(case).set(values[column])
        print(os.getpid(), flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
    time.sleep(0.01)  # distinct mostrecent timestamps
