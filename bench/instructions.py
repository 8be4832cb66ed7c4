"""Benchmark (not a test): instructions per request with metrics on and off, counted by callgrind.

Throughput on a shared machine drifts by several percent from one second to the
next; instruction counts do not. This runs the gateway's WSGI app in-process
(as `gunicorn -c gunicorn.conf.py` builds it: prepare_environment() first, then
create_app()) and sends it chat completions the way a server would (call,
iterate, close), under `valgrind --tool=callgrind`, twice per configuration with
different request counts; the difference divided by the difference in requests
is the cost of one request, start-up excluded. Configurations:
  metrics-off        METRICS_ENABLED=false
  promfork           full instrumentation
  stock-values       the same, with prometheus-client's own multiprocess value class
  http-only          the same, with the gateway's GenAI metrics off (HTTP metrics only)
  off@REF, promfork@REF  with --before REF: the same app from an older git revision,
                     metrics off and on (its own added cost, as the app itself changes too)
Counts move by about 2,000 between runs (temporary paths, ids and clocks differ).
The HTTP server's own work is not included, so the ratio here is lower than the
throughput ratio of bench/overhead.py.

    python bench/instructions.py [--before REF]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BODY = b'{"model": "mock-small", "messages": [{"role": "user", "content": "how fast is this gateway"}]}'
SHORT, LONG = 300, 1300


def drive(requests: int) -> None:
    """In the measured process: build the app as gunicorn.conf.py would and serve `requests` requests.

    The library of the checkout being measured (the current directory) is the one
    imported: from metrics/promfork/, or (older revisions) as `promfork` mapped onto
    metrics/, or as `metrics` before the package was named.
    """
    import importlib
    import types

    here = os.getcwd()
    if os.path.exists(os.path.join(here, "metrics", "promfork", "__init__.py")):
        sys.path.insert(0, os.path.join(here, "metrics"))  # ahead of the installed (editable) promfork
        hooks = importlib.import_module("promfork.gunicorn")
    elif os.path.exists(os.path.join(here, "metrics", "__init__.py")):
        package = types.ModuleType("promfork")
        package.__path__ = [os.path.join(here, "metrics")]  # not the installed (editable) promfork
        sys.modules["promfork"] = package
        hooks = importlib.import_module("promfork.gunicorn")
    else:
        hooks = importlib.import_module("metrics.gunicorn")

    hooks.prepare_environment()
    if os.environ.get("BENCH_STOCK_VALUES"):
        from prometheus_client import values

        values.ValueClass = values.MultiProcessValue()
    from webapp.app import create_app

    app = create_app()
    if os.environ.get("BENCH_NO_GENAI"):
        app.extensions["gateway"].telemetry.enabled = False  # HTTP metrics only: what the GenAI ones add

    def start_response(status, headers, exc_info=None):
        if not status.startswith("200"):
            raise RuntimeError(f"request failed: {status}")

    for _ in range(requests):
        environ = {
            "REQUEST_METHOD": "POST", "PATH_INFO": "/v1/chat/completions", "SCRIPT_NAME": "", "QUERY_STRING": "",
            "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(BODY)), "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1",
            "wsgi.input": io.BytesIO(BODY), "wsgi.errors": sys.stderr, "wsgi.url_scheme": "http",
            "wsgi.version": (1, 0), "wsgi.multithread": False, "wsgi.multiprocess": True, "wsgi.run_once": False,
        }  # fmt: skip
        body = app(environ, start_response)
        for _chunk in body:
            pass
        body.close()


def count(cwd: str, env: dict[str, str], requests: int) -> int:
    """Instructions of one whole measured process."""
    with tempfile.TemporaryDirectory(prefix="bench-instr-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        environ = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=d, PYTHONHASHSEED="0", PYTHONPATH=cwd, **env)
        cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
               os.path.join(ROOT, "bench", "instructions.py"), "--drive", str(requests)]  # fmt: skip
        out = subprocess.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return int(re.search(r"Collected : ([\d,]+)", out.stderr).group(1).replace(",", ""))


def per_request(cwd: str, env: dict[str, str], pool: concurrent.futures.Executor) -> float:
    short, long = pool.submit(count, cwd, env, SHORT), pool.submit(count, cwd, env, LONG)
    return (long.result() - short.result()) / (LONG - SHORT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", metavar="REF", help="also measure the app of this git revision")
    parser.add_argument("--drive", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive is not None:
        drive(args.drive)
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind not found: apt-get install valgrind")
    configurations = {
        "metrics-off": (ROOT, {"METRICS_ENABLED": "false"}),
        "promfork": (ROOT, {}),
        "stock-values": (ROOT, {"BENCH_STOCK_VALUES": "1"}),
        "http-only": (ROOT, {"BENCH_NO_GENAI": "1"}),
    }
    worktree = None
    if args.before:
        worktree = tempfile.mkdtemp(prefix="bench-before-")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-q", worktree, args.before], check=True)
        configurations[f"off@{args.before}"] = (worktree, {"METRICS_ENABLED": "false"})
        configurations[f"promfork@{args.before}"] = (worktree, {})
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            costs = {name: per_request(cwd, env, pool) for name, (cwd, env) in configurations.items()}
    finally:
        if worktree:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", worktree], check=False)
    off = costs["metrics-off"]
    print("instructions per chat completion, in-process WSGI app (callgrind)")
    print(f"{'configuration':<20} {'instr/request':>14} {'added':>10} {'vs metrics-off':>15}  (@REF rows: vs off@REF)")
    for name, cost in costs.items():
        base = costs[f"off@{args.before}"] if args.before and name.endswith(f"@{args.before}") else off
        print(f"{name:<20} {cost:>14,.0f} {cost - base:>+10,.0f} {base / cost:>14.3f}x")


if __name__ == "__main__":
    main()
