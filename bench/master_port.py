"""Benchmark (not a test): scrape latency through a worker vs through the master's METRICS_PORT,
while every worker is saturated with slow requests. Prints both and their ratio from one run.

    python bench/master_port.py [--workers 2] [--latency-ms 200] [--scrapes 30]

Also the helpers other benchmarks use: ``start_gunicorn``, a real Gunicorn with
METRICS_PORT (started by promfork.loadtest.gunicorn_process), and ``series_app``,
a WSGI app whose workers each hold a chosen number of series and change a few
of them per request (bench/scrape_cost.py measures the master's scrape with it).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import tempfile
import threading
import time

from promfork.loadtest.gunicorn_process import GUNICORN, GunicornProcess, booted_workers, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get(port: int, path: str, timeout: float = 60.0) -> float:
    """Seconds one GET takes (including waiting for a free worker)."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("GET", path)
    conn.getresponse().read()
    conn.close()
    return time.perf_counter() - start


SERIES_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def series_app(series: int = 2000):
    """A WSGI app (Gunicorn: ``bench.master_port:series_app()``) whose worker holds about `series` series.

    A quarter of the series are counters, two thirds histogram series (a label
    set is 13: ``_sum`` and 12 buckets), the rest ``livesum`` gauges, all made
    (at 0) when the worker loads the app. ``GET /touch?n=N`` makes N
    observations and N counter increments on random label sets: a few percent
    of the worker's series change. Observed values are multiples of 1/8, so
    sums are exact in any order and stock and promfork must agree bit for bit.
    ``SERIES_PER_WORKER`` in the environment overrides `series`.
    """
    import random
    from urllib.parse import parse_qs

    from prometheus_client import Counter, Gauge, Histogram

    series = int(os.environ.get("SERIES_PER_WORKER", series))
    counters, label_sets = series // 4, series * 2 // 3 // 13
    gauges = max(series - counters - label_sets * 13, 0)
    done = Counter("bench_requests", "Requests by route and status.", ["route", "status"])
    latency = Histogram("bench_latency_seconds", "Latency by route.", ["route"], buckets=SERIES_BOUNDS)
    level = Gauge("bench_queue_depth", "Queue depth by shard.", ["shard"], multiprocess_mode="livesum")
    done_children = [done.labels(f"/r{i % 50}", str(200 + i // 50)) for i in range(counters)]
    latency_children = [latency.labels(f"/route/{i}") for i in range(label_sets)]
    for i in range(gauges):
        level.labels(str(i)).set(0)

    def app(environ, start_response):
        n = int(parse_qs(environ.get("QUERY_STRING", "")).get("n", ["0"])[0])
        for _ in range(n):
            random.choice(latency_children).observe(random.randint(0, 80) / 8)
            random.choice(done_children).inc()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    return app


def start_gunicorn(tmp: str, workers: int, env: dict[str, str], app: str | None = None) -> tuple:
    """Start ``gunicorn -c gunicorn.conf.py`` with METRICS_PORT; return (GunicornProcess, app port, metrics port).

    Waits until the metrics port answers and every worker has booted (output in
    ``tmp/gunicorn.log``); the caller stops it (``.stop()``).
    """
    port, mport = free_port(), free_port()
    directory = os.path.join(tmp, "mp")
    env = dict(os.environ, METRICS_PORT=str(mport), PROMETHEUS_MULTIPROC_DIR=directory, **env)
    argv = [GUNICORN, "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
            "--control-socket", os.path.join(tmp, "ctl.sock")]  # fmt: skip
    if app:
        argv.append(app)
    server = GunicornProcess(
        argv,
        env=env,
        cwd=ROOT,
        log_path=os.path.join(tmp, "gunicorn.log"),
        ready_url=f"http://127.0.0.1:{mport}/metrics",
        ready=lambda: booted_workers(directory) >= workers,
    )
    return server.start(timeout=120), port, mport


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--latency-ms", type=int, default=200)
    parser.add_argument("--scrapes", type=int, default=30)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="promfork-bench-")
    server, port, mport = start_gunicorn(tmp, args.workers, {"MOCK_LATENCY_MS": str(args.latency_ms)})
    try:
        stop = threading.Event()
        body = json.dumps({"model": "mock-small", "messages": [{"role": "user", "content": "busy"}]})

        def load():
            while not stop.is_set():
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
                    conn.getresponse().read()
                    conn.close()
                except OSError:
                    return  # the server is shutting down

        clients = [threading.Thread(target=load, daemon=True) for _ in range(args.workers * 4)]
        for c in clients:
            c.start()
        time.sleep(1.0)
        via_worker, via_master = [], []
        for _ in range(args.scrapes):
            via_worker.append(get(port, "/metrics"))
            via_master.append(get(mport, "/metrics"))
        stop.set()
    finally:
        server.stop(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)

    def ms(values, q):
        return statistics.quantiles(values, n=100)[q - 1] * 1000 if q != 50 else statistics.median(values) * 1000

    print(f"{args.workers} workers saturated by {args.workers * 4} clients, provider latency {args.latency_ms} ms")
    print(f"{'path':<22} {'p50 ms':>8} {'p95 ms':>8}")
    print(f"{'through a worker':<22} {ms(via_worker, 50):>8.1f} {ms(via_worker, 95):>8.1f}")
    print(f"{'through the master':<22} {ms(via_master, 50):>8.1f} {ms(via_master, 95):>8.1f}")
    print(f"ratio worker/master (p50): {ms(via_worker, 50) / ms(via_master, 50):.1f}x")


if __name__ == "__main__":
    main()
