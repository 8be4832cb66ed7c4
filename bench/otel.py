"""Benchmark (not a test): OpenTelemetry metrics under Gunicorn, three ways, side by side in one run.

  promfork      promfork.otel.MeterProvider (files, aggregated /metrics, compaction)
  sdk           OpenTelemetry's SDK with its Prometheus exporter (one in-memory state per worker)
  multiprocess  opentelemetry-sdk-extension-prometheus-multiprocess (prometheus-client's files, stock reader)

For each, on 3 sync workers of bench/apps/otel_compare.py (``GET /work``: one counter add and one
histogram record with two attributes): what six scrapes show after 90 requests, and after a
``kill -9`` of one worker; then, with ``--max-requests 1``, the metric files left after 300
worker lifetimes and the median time of a scrape of them (in-process, each provider's own
reader, warm); and, in-process, the cost of one ``add()`` and one ``record()`` with two
attributes in microseconds.

    python bench/otel.py
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from promfork.loadtest.gunicorn_process import GUNICORN, GunicornProcess, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("promfork", "sdk", "multiprocess")
REQUESTS = 90
LIFETIMES = 300


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def jobs_shown(port: int) -> float:
    text = get(f"http://127.0.0.1:{port}/metrics").decode()
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == "jobs" for s in f.samples
               if s.name == "jobs_total")  # fmt: skip


class Run:
    def __init__(self, kind: str, *args: str, workers: int = 3) -> None:
        self.kind, self.port, self.tmp = kind, free_port(), tempfile.mkdtemp(prefix=f"bench-otel-{kind}-")
        self.directory = os.path.join(self.tmp, "mp")
        env = dict(os.environ, BENCH_OTEL=kind)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if kind != "sdk":
            os.makedirs(self.directory)
            env["PROMETHEUS_MULTIPROC_DIR"] = self.directory
        argv = [GUNICORN, "-c", "bench/apps/otel_compare.conf.py", "--bind", f"127.0.0.1:{self.port}",
                "--workers", str(workers), "--control-socket", os.path.join(self.tmp, "ctl.sock"), *args]  # fmt: skip
        self.process = GunicornProcess(argv, env=env, cwd=ROOT, ready_url=f"http://127.0.0.1:{self.port}/work",
                                       log_path=os.path.join(self.tmp, "gunicorn.log"))  # fmt: skip

    def __enter__(self) -> Run:
        self.process.start(timeout=60)
        get(f"http://127.0.0.1:{self.port}/metrics")
        self.base = jobs_shown(self.port)  # the readiness probes were /work requests too
        return self

    def __exit__(self, *exc) -> None:
        self.process.stop(timeout=20)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def work(self, count: int) -> None:
        for _ in range(count):
            get(f"http://127.0.0.1:{self.port}/work")

    def shown(self, scrapes: int = 6) -> list[float]:
        return sorted({jobs_shown(self.port) - self.base for _ in range(scrapes)})


def correctness(kind: str) -> tuple[list[float], list[float]]:
    with Run(kind) as run:
        run.work(REQUESTS)
        before_kill = run.shown()
        victim = run.process.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (
            victim in run.process.worker_pids() or len(run.process.worker_pids()) < 3
        ):
            time.sleep(0.1)
        time.sleep(1.5 if kind == "promfork" else 0.5)  # promfork folds the dead worker off the main loop
        return before_kill, run.shown()


def churn(kind: str) -> tuple[int | None, str]:
    """Files left after LIFETIMES worker lifetimes and the time a scrape of them takes (in-process, warm)."""
    with Run(kind, "--max-requests", "1", workers=2) as run:
        run.work(LIFETIMES)
        time.sleep(2)  # the last deaths are folded (promfork) or marked dead (stock recipe)
        if kind == "sdk":
            return None, "-"
        files = len([n for n in os.listdir(run.directory) if n.endswith(".db")])
        out = subprocess.run([sys.executable, "-c", SCRAPE, kind, run.directory], capture_output=True, text=True,
                             check=True, env=dict(os.environ, PROMETHEUS_MULTIPROC_DIR=run.directory))  # fmt: skip
        return files, out.stdout.strip()


SCRAPE = """
import statistics, sys, time
kind, directory = sys.argv[1], sys.argv[2]
from prometheus_client import CollectorRegistry, generate_latest
if kind == "promfork":
    from promfork.config import load_settings
    from promfork.reader.collector import exposition_registry
    registry = exposition_registry(load_settings())
    scrape = lambda: registry.exposition(None)
else:
    from prometheus_client.multiprocess import MultiProcessCollector
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    scrape = lambda: generate_latest(registry)
timings = []
for _ in range(21):
    started = time.perf_counter()
    scrape()
    timings.append((time.perf_counter() - started) * 1000)
print(f"{statistics.median(timings[1:]):.2f}")
"""


MICRO = """
import os, sys, tempfile, timeit
kind = sys.argv[1]
if kind != "sdk":
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="bench-otel-micro-")
if kind == "promfork":
    from promfork.writer import values
    assert values.install()
sys.path.insert(0, sys.argv[2])
from bench.apps.otel_compare import ATTRIBUTES, provider_for
meter = provider_for(kind).get_meter("bench")
jobs, duration = meter.create_counter("jobs"), meter.create_histogram("job.duration", unit="s")
n = 50_000
add = min(timeit.repeat(lambda: jobs.add(1, ATTRIBUTES), number=n, repeat=5)) / n * 1e6
record = min(timeit.repeat(lambda: duration.record(0.25, ATTRIBUTES), number=n, repeat=5)) / n * 1e6
print(f"{add:.2f} {record:.2f}")
"""


def micro(kind: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", MICRO, kind, ROOT], capture_output=True, text=True, check=True)
    add, record = out.stdout.split()
    return float(add), float(record)


def main() -> None:
    try:
        import opentelemetry.sdk.extension.prometheus_multiprocess  # noqa: F401
    except ImportError:
        sys.exit("pip install opentelemetry-sdk-extension-prometheus-multiprocess (make bench does)")
    print(f"OpenTelemetry metrics under Gunicorn (3 sync workers, {REQUESTS} requests, then kill -9 of one worker)")
    print(f"{'provider':<14} {'6 scrapes show':<22} {'after kill -9':<22} {'files after 300 lives':>22} "
          f"{'scrape ms':>10} {'add() µs':>9} {'record() µs':>12}")  # fmt: skip
    for kind in KINDS:
        before, after = correctness(kind)
        files, scrape_ms = churn(kind)
        add, record = micro(kind)
        shown = lambda values: ", ".join(f"{v:g}" for v in values)  # noqa: E731
        print(f"{kind:<14} {shown(before):<22} {shown(after):<22} {files if files is not None else '-':>22} "
              f"{scrape_ms:>10} {add:>9.2f} {record:>12.2f}")  # fmt: skip
    print(f"exact: every scrape shows {REQUESTS}, before and after the kill")


if __name__ == "__main__":
    main()
