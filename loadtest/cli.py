"""promfork-load: drive a request mix at the gateway, then prove /metrics equals what was served.

    promfork-load --workers 4 --max-requests 200 --requests 5000 --concurrency 64
    promfork-load --url http://127.0.0.1:8000 --duration 30 --json report.json

Either starts `gunicorn -c gunicorn.conf.py` itself (from the current directory,
on a free loopback port, optionally killing random workers with SIGKILL) or
targets a running URL. It scrapes /metrics before and after, and compares the
change with what the client sent and received: requests by route and status,
tokens, tool runs, and gauges back at zero. Exit status: 0 when everything
agrees, 1 when something disagrees, 2 when the run could not be made.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from promfork.loadtest.mix import CHAT, DEFAULT_MIX, RequestMix, RequestSpec, parse_mix

DOUBT_MARGIN_S = 0.25  # a stream the client finished this close to a kill may have been closed uncounted


@dataclass
class Outcome:
    """What the client saw for one request."""

    kind: str
    path: str
    status: int | None  # None: connection failed or was cut
    started: float
    ended: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    complete: bool = False  # a whole, well-formed response (stream ended with usage and [DONE])


@dataclass
class Tally:
    """Client-side truth, accumulated as responses arrive."""

    outcomes: list[Outcome] = field(default_factory=list)
    kills: list[float] = field(default_factory=list)
    reloads: int = 0
    scrapes: int = 0
    went_backwards: list[str] = field(default_factory=list)
    client_cpu_s: float = 0.0  # CPU time the load generator itself used while driving

    def in_doubt(self) -> list[Outcome]:
        """Requests whose count a worker kill may have decided either way.

        The server counts a response with a length just before its last byte, so a
        whole one is always counted; one cut by a kill (the client saw an error)
        may or may not be. A stream is counted when the server closes it, just
        after its last byte: a stream the client finished within a moment of a
        kill may be uncounted.
        """
        return [
            o for o in self.outcomes
            if o.status is None
            or (o.kind == "stream" and any(abs(k - o.ended) <= DOUBT_MARGIN_S for k in self.kills))
        ]  # fmt: skip


# ---------------------------------------------------------------- the app, when we start it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    """`gunicorn -c gunicorn.conf.py` started by the tool, with its own private metrics directory."""

    def __init__(self, workers: int, max_requests: int, config: str, env: dict[str, str]) -> None:
        if not os.path.exists(config):
            raise SystemExit(f"promfork-load: {config} not found; run from the project root or pass --config")
        self.port, self.metrics_port = _free_port(), _free_port()
        self.tmp = tempfile.mkdtemp(prefix="promfork-load-")
        environ = {k: v for k, v in os.environ.items() if k != "GUNICORN_CMD_ARGS"}
        environ.update(
            env, PROMETHEUS_MULTIPROC_DIR=os.path.join(self.tmp, "metrics"), METRICS_PORT=str(self.metrics_port)
        )
        environ.pop("METRICS_AUTH_TOKEN", None)
        argv = [os.path.join(os.path.dirname(sys.executable), "gunicorn"), "-c", config,
                "--bind", f"127.0.0.1:{self.port}", "--workers", str(workers)]  # fmt: skip
        if max_requests:
            argv += ["--max-requests", str(max_requests), "--max-requests-jitter", str(max(1, max_requests // 4))]
        self.log = open(os.path.join(self.tmp, "gunicorn.log"), "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(argv, env=environ, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"promfork-load: gunicorn exited at start; see {self.log.name}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1).read()
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("promfork-load: gunicorn did not answer within 30s")

    def worker_pids(self) -> list[int]:
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as src:
            return [int(p) for p in src.read().split()]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------- driving the load


async def _send(session, base: str, spec: RequestSpec) -> Outcome:
    import aiohttp

    started = time.perf_counter()
    outcome = Outcome(spec.kind, spec.path, None, started, started)
    headers = {"Content-Type": "application/json"} if spec.body is not None else None
    try:
        async with session.request(spec.method, base + spec.path, data=spec.body, headers=headers) as resp:
            raw = await resp.read()
            outcome.status = resp.status
            _read_usage(outcome, spec, raw)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        outcome.status = None
    outcome.ended = time.perf_counter()
    return outcome


def _read_usage(outcome: Outcome, spec: RequestSpec, raw: bytes) -> None:
    if outcome.status != 200:
        outcome.complete = True
        return
    if not spec.stream:
        usage = json.loads(raw)["usage"]
        outcome.complete = True
    else:
        events = [b[6:] for b in raw.decode().split("\n\n") if b.startswith("data: ")]
        if len(events) < 2 or events[-1] != "[DONE]":
            return  # cut short: not complete, tokens unknown to the client
        usage = json.loads(events[-2]).get("usage")
        if usage is None:
            return
        outcome.complete = True
    outcome.prompt_tokens = usage["prompt_tokens"]
    outcome.completion_tokens = usage["completion_tokens"]


async def drive(base: str, mix: RequestMix, concurrency: int, total: int | None, duration: float | None,
                tally: Tally, app: App | None, kill_every: float | None, progress: bool,
                metrics_url: str | None = None, token: str | None = None,
                hup_every: float | None = None) -> float:  # fmt: skip
    """Send the mix at `concurrency` until `total` requests or `duration` seconds; return elapsed seconds."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=120)
    metrics_headers = {"Authorization": f"Bearer {token}"} if token else {}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    started = time.perf_counter()
    deadline = started + duration if duration else None
    issued = 0

    def more() -> bool:
        nonlocal issued
        if (total is not None and issued >= total) or (deadline is not None and time.perf_counter() >= deadline):
            return False
        issued += 1
        return True

    async def client(session):
        while more():
            tally.outcomes.append(await _send(session, base, mix.next()))

    async def killer():
        rng = random.Random(7)  # noqa: S311 (picks a victim, not a secret)
        while True:
            await asyncio.sleep(kill_every)
            try:
                victim = rng.choice(app.worker_pids())
                os.kill(victim, signal.SIGKILL)
                tally.kills.append(time.perf_counter())
            except (IndexError, OSError):
                continue

    async def reloader():
        while True:
            await asyncio.sleep(hup_every)
            app.proc.send_signal(signal.SIGHUP)
            tally.reloads += 1

    async def watcher():
        # Scrape during the run: no counter may ever be lower than in the scrape before.
        previous: dict = {}
        while True:
            await asyncio.sleep(0.5)
            try:
                async with session.get(metrics_url, headers=metrics_headers) as resp:
                    text = await resp.text()
            except (aiohttp.ClientError, TimeoutError):
                continue
            current = monotonic_samples(text)
            tally.scrapes += 1
            for key, old in previous.items():
                new = current.get(key)
                if new is None or new < old:
                    tally.went_backwards.append(f"{key}: {old} -> {new}")
            previous = current

    async def reporter():
        while True:
            await asyncio.sleep(0.5)
            _progress_line(tally, time.perf_counter() - started)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        side = []
        if kill_every and app is not None:
            side.append(asyncio.create_task(killer()))
        if hup_every and app is not None:
            side.append(asyncio.create_task(reloader()))
        if progress:
            side.append(asyncio.create_task(reporter()))
        if metrics_url:
            side.append(asyncio.create_task(watcher()))
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        for task in side:
            task.cancel()
    elapsed = time.perf_counter() - started
    if progress:
        _progress_line(tally, elapsed)
        print(file=sys.stderr)
    return elapsed


def _progress_line(tally: Tally, elapsed: float) -> None:
    done = len(tally.outcomes)
    failed = sum(1 for o in tally.outcomes if o.status is None)
    rate = done / elapsed if elapsed else 0.0
    line = f"\r  {done:>8,} done  {rate:>8,.0f} req/s  {failed:>5} failed  {len(tally.kills):>3} workers killed"
    print(line, end="", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- comparing with /metrics


def scrape(url: str, token: str | None) -> dict[tuple, float]:
    """Every sample of `url`, keyed (name, sorted labels)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 (a URL the operator gave)
    with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 (a URL the operator gave)
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def monotonic_samples(text: str) -> dict[tuple, float]:
    """Counter and histogram samples aggregated over workers (per-process ones restart with their process)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        if family.type in ("counter", "histogram") and not family.name.startswith("process_")
        for s in family.samples
    }


def metric_sum(samples: dict, name: str, **labels: str) -> float:
    """Sum of `name` samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and wanted <= set(lab))


@dataclass
class Row:
    """One line of the verdict table."""

    what: str
    client: float
    metrics: float
    tolerance: float
    ok: bool


def compare(tally: Tally, before: dict, after: dict) -> list[Row]:
    """Client truth vs the change in /metrics, row by row."""
    doubt = tally.in_doubt()
    sure = [o for o in tally.outcomes if o not in doubt] if doubt else tally.outcomes
    rows = []

    def delta(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    def add(what: str, client: float, measured: float, tolerance: float) -> None:
        # Requests in doubt may or may not have been counted: allow them, never more.
        ok = client <= measured <= client + tolerance if tolerance else measured == client
        rows.append(Row(what, client, measured, tolerance, ok))

    chat_status = Counter(o.status for o in sure if o.path == CHAT and o.status is not None)
    doubt_chat = sum(1 for o in doubt if o.path == CHAT)
    for status in sorted(set(chat_status) | {200}):
        add(f"http_requests_total{{route={CHAT},status={status}}}", chat_status[status],
            delta("http_requests_total", route=CHAT, status=str(status)), doubt_chat)  # fmt: skip
    unmatched = sum(1 for o in sure if o.kind == "unmatched" and o.status == 404)
    add("http_requests_total{route=unmatched,status=404}", unmatched,
        delta("http_requests_total", route="unmatched", status="404"),
        sum(1 for o in doubt if o.kind == "unmatched"))  # fmt: skip
    for kind in ("prompt", "completion"):
        client = sum(getattr(o, f"{kind}_tokens") for o in sure)
        per_request = max((getattr(o, f"{kind}_tokens") for o in tally.outcomes), default=0)
        # a tool request makes two provider calls, so a doubtful one can count up to twice its usage
        add(f"llm_tokens_total{{type={kind}}}", client, delta("llm_tokens_total", type=kind),
            2 * per_request * doubt_chat)  # fmt: skip
    tools = sum(1 for o in sure if o.kind == "tool" and o.status == 200)
    add("llm_tool_executions_total{tool=calculator,status=ok}", tools,
        delta("llm_tool_executions_total", tool="calculator", status="ok"),
        sum(1 for o in doubt if o.kind == "tool"))  # fmt: skip
    rows.append(Row(f"counters never decreased ({tally.scrapes} scrapes during the run)", 0,
                    len(tally.went_backwards), 0, not tally.went_backwards))  # fmt: skip
    for gauge in ("llm_streams_active", "http_requests_in_flight"):
        rows.append(Row(f"{gauge} after the run", 0, metric_sum(after, gauge), 0, metric_sum(after, gauge) == 0))
    return rows


def settle(url: str, token: str | None, tally: Tally, before: dict, timeout: float = 15.0) -> tuple[dict, list[Row]]:
    """Scrape until the numbers agree or stop changing (workers finish, compaction runs)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        after = scrape(url, token)
        rows = compare(tally, before, after)
        if (
            all(r.ok for r in rows)
            or time.monotonic() >= deadline
            or (after == last and time.monotonic() > deadline - timeout + 3)
        ):
            return after, rows
        last = after
        time.sleep(0.25)


# ---------------------------------------------------------------- report


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1]


def client_capacity(tally: Tally) -> float:
    """Requests per CPU-second of the load generator itself: its ceiling on a core of its own."""
    return len(tally.outcomes) / tally.client_cpu_s if tally.client_cpu_s > 0 else float("inf")


def print_report(tally: Tally, elapsed: float, rows: list[Row]) -> None:
    done = tally.outcomes
    latencies = [o.ended - o.started for o in done if o.status is not None]
    failed = sum(1 for o in done if o.status is None)
    kinds = Counter(o.kind for o in done)
    print(f"\nsent {len(done):,} requests in {elapsed:.1f}s: {len(done) / elapsed:,.0f} req/s "
          f"({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})")  # fmt: skip
    print(f"latency p50 {percentile(latencies, 50) * 1000:.1f} ms  p90 {percentile(latencies, 90) * 1000:.1f} ms  "
          f"p99 {percentile(latencies, 99) * 1000:.1f} ms   failed {failed}   workers killed {len(tally.kills)}  "
          f"reloads {tally.reloads}  "
          f"in doubt {len(tally.in_doubt())}")  # fmt: skip
    busy = tally.client_cpu_s / elapsed if elapsed > 0 else 0.0
    print(f"load generator: {tally.client_cpu_s:.2f} CPU-s, {busy:.0%} of one core; it could drive about "
          f"{client_capacity(tally):,.0f} req/s with a core of its own")  # fmt: skip
    if busy > 0.9:
        print("  (it used most of a core: the load generator, not the server, may be what limits the rate)")
    width = max(len(r.what) for r in rows)
    print(f"\n{'check':<{width}}  {'client':>12}  {'metrics':>12}  {'allowed':>8}  verdict")
    for r in rows:
        allowed = f"+{r.tolerance:g}" if r.tolerance else "exact"
        print(
            f"{r.what:<{width}}  {r.client:>12,.0f}  {r.metrics:>12,.0f}  {allowed:>8}  {'ok' if r.ok else 'MISMATCH'}"
        )
    verdict = "all totals agree" if all(r.ok for r in rows) else "METRICS DISAGREE WITH WHAT WAS SERVED"
    print(f"\nverdict: {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="promfork-load", description=__doc__.split("\n\n")[0])
    target = parser.add_argument_group("target (start the app, or use --url)")
    target.add_argument("--url", help="base URL of a running gateway, e.g. http://127.0.0.1:8000")
    target.add_argument("--metrics-url", help="where to scrape (default: URL/metrics, or the master's METRICS_PORT)")
    target.add_argument("--token", default=os.environ.get("METRICS_AUTH_TOKEN"), help="bearer token for /metrics")
    target.add_argument("--workers", type=int, default=4, help="workers when the tool starts the app (default 4)")
    target.add_argument("--max-requests", type=int, default=0, help="recycle workers after this many requests")
    target.add_argument("--kill-workers-every", type=float, metavar="S", help="SIGKILL a random worker every S seconds")
    target.add_argument("--hup-every", type=float, metavar="S", help="reload the master (HUP) every S seconds")
    target.add_argument(
        "--config", default="gunicorn.conf.py", help="gunicorn config to start (default ./gunicorn.conf.py)"
    )
    target.add_argument("--mock-latency-ms", type=int, default=0, help="MOCK_LATENCY_MS for the started app")
    load = parser.add_argument_group("load")
    load.add_argument("--requests", type=int, help="how many requests (default 2000 unless --duration)")
    load.add_argument("--duration", type=float, help="run for this many seconds instead of a count")
    load.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    load.add_argument("--mix", default=",".join(f"{k}={v}" for k, v in DEFAULT_MIX.items()), help="request mix weights")
    load.add_argument("--seed", type=int, default=1, help="seed of the request mix")
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    out.add_argument("--no-progress", action="store_true", help="no live progress line on stderr")
    args = parser.parse_args(argv)

    try:
        weights = parse_mix(args.mix)
    except ValueError as exc:
        parser.error(f"--mix: {exc}")
    if args.concurrency < 1 or (args.requests is not None and args.requests < 1):
        parser.error("--concurrency and --requests must be positive")
    if (args.kill_workers_every is not None or args.hup_every is not None) and args.url:
        parser.error("--kill-workers-every and --hup-every need the tool to start the app (no --url)")
    total = args.requests if args.requests is not None else (None if args.duration else 2000)
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        print("promfork-load needs aiohttp: pip install 'promfork[load]'", file=sys.stderr)
        return 2

    app = None
    if args.url:
        base = args.url.rstrip("/")
        metrics_url = args.metrics_url or base + "/metrics"
    else:
        env = {"MOCK_LATENCY_MS": str(args.mock_latency_ms)}
        app = App(args.workers, args.max_requests, args.config, env)
        base = f"http://127.0.0.1:{app.port}"
        metrics_url = args.metrics_url or f"http://127.0.0.1:{app.metrics_port}/metrics"
    tally = Tally()
    try:
        before = scrape(metrics_url, args.token)
        progress = not args.no_progress and sys.stderr.isatty()
        mix = RequestMix(weights, args.seed)
        run = drive(base, mix, args.concurrency, total, args.duration, tally, app, args.kill_workers_every, progress,
                    metrics_url, args.token, args.hup_every)  # fmt: skip
        cpu_before = time.process_time()
        elapsed = asyncio.run(run)
        tally.client_cpu_s = time.process_time() - cpu_before
        _, rows = settle(metrics_url, args.token, tally, before)
    except OSError as exc:
        print(f"promfork-load: cannot reach {metrics_url}: {exc}", file=sys.stderr)
        return 2
    finally:
        if app is not None:
            app.stop()
    print_report(tally, elapsed, rows)
    if args.json:
        report = {
            "elapsed_s": elapsed,
            "requests": len(tally.outcomes),
            "rate_per_s": len(tally.outcomes) / elapsed,
            "client_cpu_s": tally.client_cpu_s,
            "client_rate_per_cpu_s": client_capacity(tally),
            "kills": len(tally.kills),
            "reloads": tally.reloads,
            "in_doubt": len(tally.in_doubt()),
            "latency_ms": {
                f"p{q}": percentile([o.ended - o.started for o in tally.outcomes if o.status], q) * 1000
                for q in (50, 90, 99)
            },
            "by_kind_status": {
                f"{k} {s}": n for (k, s), n in Counter((o.kind, o.status) for o in tally.outcomes).items()
            },
            "checks": [asdict(r) for r in rows],
            "went_backwards": tally.went_backwards[:100],
            "agree": all(r.ok for r in rows),
        }
        with open(args.json, "w") as out_file:
            json.dump(report, out_file, indent=2)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
