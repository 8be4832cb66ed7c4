"""Measurement (not a test): how many series one host's /metrics produces, for sizing Prometheus.

Starts the gateway under real Gunicorn with each requested worker count, drives a representative
mix of traffic (both mock models, streamed and not, a tool call, an unknown model, a malformed
body, an unknown path, the model and health endpoints), scrapes /metrics once and counts the
samples Prometheus would store (one series each; exposition-only `_created` samples excluded).
The difference between two worker counts gives the series each extra worker adds; the rest is
per host. Prints the counts per family and the disk a Prometheus needs to keep them.

    python bench/series_count.py [--workers 2 4] [--scrape-interval 15] [--retention-days 15]
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import shutil
import tempfile

from prometheus_client.parser import text_string_to_metric_families

from promfork.loadtest.gunicorn_process import GUNICORN, GunicornError, GunicornProcess, booted_workers, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Prometheus' TSDB stores a sample in about 1-2 bytes after compression; size with the upper end.
BYTES_PER_SAMPLE = 2


def call(port: int, method: str, path: str, body: dict | bytes | None = None) -> int:
    """One request to the gateway; returns the status (the body is read and dropped)."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def representative_load(port: int, rounds: int) -> collections.Counter:
    """Traffic touching every route and label value a production gateway sees; returns statuses."""
    statuses: collections.Counter = collections.Counter()
    tools = [{"type": "function", "function": {"name": "calculator"}}]
    for i in range(rounds):
        for model in ("mock-small", "mock-large"):
            for stream in (False, True):
                body = {"model": model, "messages": [{"role": "user", "content": f"hello {i}"}], "stream": stream}
                statuses[call(port, "POST", "/v1/chat/completions", body)] += 1
            body = {"model": model, "messages": [{"role": "user", "content": "6 * 7"}], "tools": tools}
            statuses[call(port, "POST", "/v1/chat/completions", body)] += 1
            statuses[call(port, "GET", f"/v1/models/{model}")] += 1
        unknown = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}
        statuses[call(port, "POST", "/v1/chat/completions", unknown)] += 1
        statuses[call(port, "POST", "/v1/chat/completions", b"{not json")] += 1
        statuses[call(port, "GET", "/v1/models")] += 1
        statuses[call(port, "GET", "/no/such/path")] += 1
        statuses[call(port, "GET", "/healthz")] += 1
        statuses[call(port, "GET", "/readyz")] += 1
    return statuses


def count_series(port: int) -> collections.Counter:
    """Series per metric family in one scrape of /metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    per_family: collections.Counter = collections.Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                per_family[family.name] += 1
    return per_family


def measure(workers: int, rounds: int) -> tuple[collections.Counter, collections.Counter]:
    """Run a gateway with `workers` workers, load it, and count its series."""
    tmp = tempfile.mkdtemp(prefix="promfork-series-")
    port = free_port()
    directory = os.path.join(tmp, "mp")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METRICS_", "GUNICORN_"))}
    env.update(PROMETHEUS_MULTIPROC_DIR=directory, WEB_CONCURRENCY=str(workers))
    argv = [GUNICORN, "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
            "--control-socket", os.path.join(tmp, "ctl.sock")]  # fmt: skip
    server = GunicornProcess(
        argv,
        env=env,
        cwd=ROOT,
        log_path=os.path.join(tmp, "gunicorn.log"),
        ready_url=f"http://127.0.0.1:{port}/healthz",
        ready=lambda: booted_workers(directory) >= workers,
    )
    try:
        try:
            server.start(timeout=60)
        except GunicornError as exc:
            raise SystemExit(f"gunicorn with {workers} workers did not start:\n{server.log()}") from exc
        statuses = representative_load(port, rounds)
        return count_series(port), statuses
    finally:
        server.stop(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs=2, default=[2, 4], metavar=("FEW", "MORE"))
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the request mix per run")
    parser.add_argument("--scrape-interval", type=float, default=15.0, help="seconds")
    parser.add_argument("--retention-days", type=float, default=15.0)
    args = parser.parse_args()
    few, more = sorted(args.workers)
    if few == more:
        parser.error("--workers needs two different counts")
    (series_few, statuses), (series_more, _) = measure(few, args.rounds), measure(more, args.rounds)
    total_few, total_more = sum(series_few.values()), sum(series_more.values())
    per_worker = (total_more - total_few) / (more - few)
    per_host = total_few - per_worker * few
    print(f"request mix per run: {dict(sorted(statuses.items()))} (status: count)")
    print(f"{'family':<52} {few:>3} workers {more:>3} workers")
    for name in sorted(series_few.keys() | series_more.keys()):
        print(f"{name:<52} {series_few[name]:>11} {series_more[name]:>11}")
    print(f"{'total series per host':<52} {total_few:>11} {total_more:>11}")
    print(f"series per extra worker: {per_worker:g}; fixed per host: {per_host:g}")
    samples_per_second = total_more / args.scrape_interval
    retention = args.retention_days * 86400
    disk = samples_per_second * retention * BYTES_PER_SAMPLE
    print(
        f"one host with {more} workers, {args.scrape_interval:g} s scrapes, {args.retention_days:g} days: "
        f"{samples_per_second:.1f} samples/s, about {disk / 1e6:.0f} MB of TSDB at {BYTES_PER_SAMPLE} bytes/sample"
    )


if __name__ == "__main__":
    main()
