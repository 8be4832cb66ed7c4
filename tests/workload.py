"""Helper process: fork N short-lived "workers" that write every metric kind, then exit.

Run as `python tests/workload.py DIR N FIRST` with prometheus_client in multiprocess
mode. Prints one JSON line per worker with what it wrote (the test's truth).
Used instead of N interpreter starts: a fork costs a millisecond.
"""

import json
import os
import sys
import time

directory, count, first = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory

from prometheus_client import Counter, Gauge, Histogram, Summary  # noqa: E402 (after the env var, on purpose)

jobs = Counter("jobs_total", "Jobs.", ["kind"])
latency = Histogram("latency_seconds", "Latency.", ["route"], buckets=(0.05, 0.1, 0.5, 1.0))
sizes = Summary("sizes_bytes", "Sizes.")
g_sum = Gauge("queue_sum", "Sum gauge.", multiprocess_mode="sum")
g_max = Gauge("peak_max", "Max gauge.", multiprocess_mode="max")
g_min = Gauge("floor_min", "Min gauge.", multiprocess_mode="min")
g_recent = Gauge("recent", "Most recent gauge.", multiprocess_mode="mostrecent")
g_live = Gauge("busy_livesum", "Live sum gauge.", multiprocess_mode="livesum")
g_all = Gauge("temp_all", "All gauge.", multiprocess_mode="all")

for n in range(first, first + count):
    pid = os.fork()
    if pid == 0:
        jobs.labels("a").inc(n + 1)
        jobs.labels("b").inc(2 * (n + 1))
        latency.labels("/x").observe(0.01 * (n % 7 + 1))
        latency.labels("/x").observe(0.3)
        sizes.observe(n)
        g_sum.set(n)
        g_max.set(n)
        g_min.set(100 - n)
        g_recent.set(n)
        g_live.set(1)
        g_all.set(n)
        print(json.dumps({"pid": os.getpid(), "n": n}), flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
    time.sleep(0.001)  # distinct mostrecent timestamps
