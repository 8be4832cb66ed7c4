"""Benchmark (not a test): scrape latency through a worker vs through the master's METRICS_PORT,
while every worker is saturated with slow requests. Prints both and their ratio from one run.

    python bench/master_port.py [--workers 2] [--latency-ms 200] [--scrapes 30]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, timeout: float = 60.0) -> float:
    """Seconds one GET takes (including waiting for a free worker)."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("GET", path)
    conn.getresponse().read()
    conn.close()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--latency-ms", type=int, default=200)
    parser.add_argument("--scrapes", type=int, default=30)
    args = parser.parse_args()
    port, mport = free_port(), free_port()
    tmp = tempfile.mkdtemp(prefix="promfork-bench-")
    env = dict(os.environ, METRICS_PORT=str(mport), MOCK_LATENCY_MS=str(args.latency_ms),
               PROMETHEUS_MULTIPROC_DIR=os.path.join(tmp, "mp"))  # fmt: skip
    gunicorn = os.path.join(os.path.dirname(sys.executable), "gunicorn")
    argv = [gunicorn, "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}", "--workers", str(args.workers),
            "--control-socket", os.path.join(tmp, "ctl.sock")]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                get(port, "/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
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
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)

    def ms(values, q):
        return statistics.quantiles(values, n=100)[q - 1] * 1000 if q != 50 else statistics.median(values) * 1000

    print(f"{args.workers} workers saturated by {args.workers * 4} clients, provider latency {args.latency_ms} ms")
    print(f"{'path':<22} {'p50 ms':>8} {'p95 ms':>8}")
    print(f"{'through a worker':<22} {ms(via_worker, 50):>8.1f} {ms(via_worker, 95):>8.1f}")
    print(f"{'through the master':<22} {ms(via_master, 50):>8.1f} {ms(via_master, 95):>8.1f}")
    print(f"ratio worker/master (p50): {ms(via_worker, 50) / ms(via_master, 50):.1f}x")


if __name__ == "__main__":
    main()
