"""Benchmark (not a test): what instrumentation costs, as throughput ratios from one run.

Runs the same chat handler under Gunicorn (2 sync workers) as
  promfork      gunicorn -c gunicorn.conf.py (full instrumentation)
  metrics-off   the same with METRICS_ENABLED=false
  plain         a bare Flask app with the same handler, no metrics code
  stock-recipe  prometheus-client's multiprocess docs recipe (before/after_request)
  exporter      prometheus-flask-exporter (if installed)
  promfork@REF  with --before REF: gunicorn.conf.py of an older revision (git worktree)
driven by wrk (Debian package) with keep-alive POSTs of a chat completion.

Every server is started once and stays up; then one server at a time is loaded
for a second or two, and every slice of another configuration is bracketed by
two slices of metrics-off: its ratio is taken against their mean, so drift of
the machine's speed (on a shared host, 5% within seconds) cancels. The order of
the other configurations rotates each round. Printed: the median ratio and its
interquartile range; metrics-off's row compares each of its slices with its
neighbours, which is the noise floor of the measurement itself. (On a shared
host a CPU's speed can swing by 8% from one second to the next, in CPU time per
request as much as in throughput; medians need tens of rounds to settle within
a few percent. bench/instructions.py counts instructions instead: exact.)
With taskset and two or more CPUs every server is pinned to one CPU and wrk to
another: what is compared is the server's CPU time per request, and the added
time per request follows from the throughput. Worker memory (RSS, summed over
the two workers) is read from /proc after the run.

    python bench/overhead.py [--rounds 30] [--seconds 1] [--connections 16] [--before REF] [--unpinned]

``--unpinned --rounds 5 --seconds 6`` is the run a new user would make: no pinning, 6 s
slices, medians of 5.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from promfork.loadtest.gunicorn_process import GUNICORN, GunicornProcess, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PINNED = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
SERVER_CPU = ["taskset", "-c", "1"] if PINNED else []
LOAD_CPU = ["taskset", "-c", "0"] if PINNED else []
BODY = json.dumps({"model": "mock-small", "messages": [{"role": "user", "content": "how fast is this gateway"}]})
WORKERS = 2


@dataclass
class Server:
    """One configuration's running Gunicorn and what was measured against it."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: str = ROOT
    rates: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # each slice against the mean of the two metrics-off around it
    process: GunicornProcess | None = None
    tmp: str = ""
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def start(self) -> None:
        """Launch gunicorn (wait_ready() waits for it, so that every configuration starts at once)."""
        self.port = free_port()
        # Same place for every configuration: RAM-backed, as deploy/ recommends for metric files.
        self.tmp = tempfile.mkdtemp(prefix="bench-overhead-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        environ = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=os.path.join(self.tmp, "mp"), **self.env)
        os.makedirs(environ["PROMETHEUS_MULTIPROC_DIR"], mode=0o700)
        cmd = [GUNICORN, *self.argv, "--bind", f"127.0.0.1:{self.port}", "--workers", str(WORKERS),
               "--control-socket", os.path.join(self.tmp, "ctl.sock"), "--log-level", "warning",
               "--worker-tmp-dir", self.tmp]  # fmt: skip
        self.process = GunicornProcess(
            SERVER_CPU + cmd, env=environ, cwd=self.cwd, log_path=os.path.join(self.tmp, "gunicorn.log"),
            ready_url=self.url,  # a GET of the chat route answers 405 once a worker serves
        )  # fmt: skip
        self.process.launch()

    def wait_ready(self) -> None:
        self.process.wait_ready(timeout=30)

    def worker_rss_mib(self) -> float:
        """Resident memory of the workers (children of the master), summed."""
        total = 0
        for pid in self.process.worker_pids():
            try:
                with open(f"/proc/{pid}/status") as status:
                    total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
            except (OSError, StopIteration):
                pass
        return total / 1024

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=30)
        shutil.rmtree(self.tmp, ignore_errors=True)


def configurations(before: str | None, worktree: str | None) -> list[Server]:
    ref = ["-c", "bench/apps/gunicorn_ref.conf.py"]
    found = [
        Server("promfork", ["-c", "gunicorn.conf.py"], {}),
        Server("metrics-off", ["-c", "gunicorn.conf.py"], {"METRICS_ENABLED": "false"}),
        Server("plain", [*ref, "bench.apps.plain:create_app()"], {}),
        Server("stock-recipe", [*ref, "bench.apps.stock:create_app()"], {}),
    ]
    try:
        import prometheus_flask_exporter  # noqa: F401

        found.append(Server("exporter", [*ref, "bench.apps.exporter:create_app()"], {}))
    except ImportError:
        print("prometheus-flask-exporter not installed: pip install prometheus-flask-exporter to compare it")
    if before and worktree:
        found.append(Server(f"promfork@{before}", ["-c", "gunicorn.conf.py"], {}, cwd=worktree))
    return found


def wrk(server: Server, seconds: int, connections: int, lua: str) -> float:
    cmd = [*LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", lua, server.url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    failed = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if failed:
        raise RuntimeError(f"{server.name}: {failed.group(1)} failed responses")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def add_worktree(ref: str) -> str:
    where = tempfile.mkdtemp(prefix="bench-before-")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-q", where, ref], check=True)
    return where


def report(servers: list[Server]) -> None:
    off = next(s for s in servers if s.name == "metrics-off")
    off_rate = statistics.median(off.rates)
    pinned = bool(SERVER_CPU)
    cpus = 1 if pinned else 2
    print(f"\nserver pinned to one CPU, wrk to another: {pinned}; {len(servers[0].rates)} rounds")
    print(f"{'configuration':<20} {'req/s':>7} {'vs metrics-off':>15} {'(middle half)':>14} "
          f"{'added us/req':>13} {'workers RSS MiB':>16}")  # fmt: skip
    for server in servers:
        ratios = sorted(server.ratios)
        ratio = statistics.median(ratios)
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratio, ratio, ratio]
        added = (1 / (off_rate * ratio) - 1 / off_rate) * 1e6 * cpus  # server CPU time per request
        spread = f"{quartiles[0]:.3f}-{quartiles[2]:.3f}"
        print(f"{server.name:<20} {statistics.median(server.rates):>7.0f} {ratio:>14.3f}x {spread:>14} "
              f"{added:>13.1f} {server.worker_rss_mib():>16.1f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seconds", type=int, default=1)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--before", metavar="REF", help="also measure gunicorn.conf.py of this git revision")
    parser.add_argument(
        "--unpinned", action="store_true", help="no taskset: servers and wrk share the CPUs, as a plain run would"
    )
    args = parser.parse_args()
    if args.unpinned:
        SERVER_CPU.clear()
        LOAD_CPU.clear()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    worktree = add_worktree(args.before) if args.before else None
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(
            f'wrk.method = "POST"\nwrk.body = {json.dumps(BODY)}\nwrk.headers["Content-Type"] = "application/json"\n'
        )
    servers = configurations(args.before, worktree)
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready()
            wrk(server, 1, args.connections, lua.name)  # warm-up, not counted
        off = next(s for s in servers if s.name == "metrics-off")
        others = [s for s in servers if s is not off]
        before = wrk(off, args.seconds, args.connections, lua.name)
        for round_no in range(args.rounds):
            shift = round_no % len(others)
            for server in others[shift:] + others[:shift]:
                rate = wrk(server, args.seconds, args.connections, lua.name)
                after = wrk(off, args.seconds, args.connections, lua.name)
                server.rates.append(rate)
                server.ratios.append(rate / ((before + after) / 2))
                off.rates.append(after)
                off.ratios.append(after / before)  # the noise floor: the same configuration, one slice later
                before = after
            line = "  ".join(f"{s.name} {s.ratios[-1]:.3f}" for s in others)
            print(f"round {round_no + 1:>2}: {line}", flush=True)
        report(servers)
    finally:
        for server in servers:
            server.stop()
        os.unlink(lua.name)
        if worktree:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", worktree], check=False)


if __name__ == "__main__":
    main()
