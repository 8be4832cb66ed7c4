"""Benchmark (not a test): what instrumentation costs, as throughput ratios from one run.

Runs the same chat handler under Gunicorn (2 sync workers) as
  promfork      gunicorn -c gunicorn.conf.py (full instrumentation)
  metrics-off   the same with METRICS_ENABLED=false
  plain         a bare Flask app with the same handler, no metrics code
  stock-recipe  prometheus-client's multiprocess docs recipe (before/after_request)
  exporter      prometheus-flask-exporter (if installed)
driven by wrk (Debian package) with a POST of a chat completion, alternating the
configurations for several rounds so that machine noise hits all of them alike.
With taskset and two or more CPUs, the server is pinned to one CPU and wrk to
another, so the server's CPU cost is what is measured and the two never fight
for a core. Prints median requests/s, the median of each round's ratio to
metrics-off (rounds are minutes apart at most; ratios within a round are the
fair comparison) and the added time per request.

    python bench/overhead.py [--rounds 5] [--seconds 5] [--connections 16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUNICORN = os.path.join(os.path.dirname(sys.executable), "gunicorn")
PINNED = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
SERVER_CPU = ["taskset", "-c", "1"] if PINNED else []
LOAD_CPU = ["taskset", "-c", "0"] if PINNED else []
BODY = json.dumps({"model": "mock-small", "messages": [{"role": "user", "content": "how fast is this gateway"}]})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configs() -> dict[str, tuple[list[str], dict[str, str]]]:
    ref = ["-c", "bench/apps/gunicorn_ref.conf.py"]
    found = {
        "promfork": (["-c", "gunicorn.conf.py"], {}),
        "metrics-off": (["-c", "gunicorn.conf.py"], {"METRICS_ENABLED": "false"}),
        "plain": ([*ref, "bench.apps.plain:create_app()"], {}),
        "stock-recipe": ([*ref, "bench.apps.stock:create_app()"], {}),
    }
    try:
        import prometheus_flask_exporter  # noqa: F401

        found["exporter"] = ([*ref, "bench.apps.exporter:create_app()"], {})
    except ImportError:
        print("prometheus-flask-exporter not installed: pip install prometheus-flask-exporter to compare it")
    return found


def run_one(name: str, argv: list[str], env: dict[str, str], seconds: int, connections: int, lua: str) -> float:
    port = free_port()
    # Same place for every configuration: RAM-backed, as deploy/ recommends for metric files.
    tmp = tempfile.mkdtemp(prefix="bench-overhead-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    environ = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=os.path.join(tmp, "mp"), **env)
    os.makedirs(environ["PROMETHEUS_MULTIPROC_DIR"], mode=0o700)
    cmd = [GUNICORN, *argv, "--bind", f"127.0.0.1:{port}", "--workers", "2", "--control-socket",
           os.path.join(tmp, "ctl.sock"), "--log-level", "warning", "--worker-tmp-dir", tmp]  # fmt: skip
    proc = subprocess.Popen(SERVER_CPU + cmd, cwd=ROOT, env=environ, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        for _ in range(100):
            try:
                req = urllib.request.Request(url, BODY.encode(), {"Content-Type": "application/json"})
                urllib.request.urlopen(req, timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"{name} did not start")
        wrk = [*LOAD_CPU, "wrk", "-t1", f"-c{connections}", "-s", lua]
        subprocess.run([*wrk, "-d1s", url], capture_output=True, check=True)
        out = subprocess.run([*wrk, f"-d{seconds}s", url], capture_output=True, text=True, check=True).stdout
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if non2xx:
            raise RuntimeError(f"{name}: {non2xx.group(1)} failed responses")
        return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(
            f'wrk.method = "POST"\nwrk.body = {json.dumps(BODY)}\nwrk.headers["Content-Type"] = "application/json"\n'
        )
    runs: dict[str, list[float]] = {}
    plan = configs()
    for round_no in range(args.rounds):
        for name, (argv, env) in plan.items():
            rate = run_one(name, argv, env, args.seconds, args.connections, lua.name)
            runs.setdefault(name, []).append(rate)
            print(f"round {round_no + 1}: {name:<13} {rate:8.0f} req/s", flush=True)
    os.unlink(lua.name)
    off = statistics.median(runs["metrics-off"])
    cpus = 1 if PINNED else 2
    print(f"\nserver pinned to one CPU, wrk to another: {PINNED}")
    header = f"{'configuration':<14} {'req/s (median)':>15} {'vs metrics-off':>15} {'(min-max)':>15}"
    print(f"{header} {'added us/request':>17}")
    for name, rates in runs.items():
        ratios = [r / o for r, o in zip(rates, runs["metrics-off"], strict=True)]
        ratio = statistics.median(ratios)
        added = (1 / (off * ratio) - 1 / off) * 1e6 * cpus  # CPU time per request on the server
        spread = f"{min(ratios):.3f}-{max(ratios):.3f}"
        print(f"{name:<14} {statistics.median(rates):>15.0f} {ratio:>14.3f}x {spread:>15} {added:>17.1f}")


if __name__ == "__main__":
    main()
