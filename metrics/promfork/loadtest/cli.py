"""promfork-load: drive a request mix at the gateway or your own app, then prove /metrics equals what was served.

    promfork-load --workers 4 --max-requests 200 --requests 5000 --concurrency 64
    promfork-load --config gunicorn.conf.py --request GET:/hello --request 'GET:/items/{n}=/items/<item_id>*3'
    promfork-load --worker-class gthread --gunicorn-args="--threads 4" --kill-workers-every 2 --duration 30
    promfork-load --url http://127.0.0.1:8000 --duration 30 --json report.json

Either starts `gunicorn -c gunicorn.conf.py` itself (from the current directory,
on a free loopback port, with any worker class and gunicorn arguments,
optionally killing random workers with SIGKILL) or targets a running URL. It
scrapes /metrics before and after, and compares the change with what the client
sent and received: requests by route and status, tokens, tool runs, and gauges
back at zero. Exit status: 0 when everything agrees, 1 when something
disagrees, 2 when the run could not be made. The server's log is kept, and its
path printed, unless the run agreed.

This module only parses arguments and wires the parts together: server.py runs
gunicorn, driver.py sends the load, verdict.py judges, report.py reports.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from promfork.loadtest.driver import Disruption, Load, run
from promfork.loadtest.mix import DEFAULT_MIX, CustomMix, RequestMix, parse_mix, parse_request
from promfork.loadtest.report import Target, json_report, print_report, write_json
from promfork.loadtest.scrape import scrape
from promfork.loadtest.server import GunicornServer, ServerError, check_gunicorn_args
from promfork.loadtest.tally import Tally
from promfork.loadtest.verdict import settle


def build_parser() -> argparse.ArgumentParser:
    """promfork-load's command line."""
    parser = argparse.ArgumentParser(prog="promfork-load", description=__doc__.split("\n\n")[0])
    target = parser.add_argument_group("target (start the app, or use --url)")
    target.add_argument("--url", help="base URL of a running gateway, e.g. http://127.0.0.1:8000")
    target.add_argument("--metrics-url", help="where to scrape (default: URL/metrics, or the master's METRICS_PORT)")
    target.add_argument("--token", default=os.environ.get("METRICS_AUTH_TOKEN"), help="bearer token for /metrics")
    target.add_argument("--workers", type=int, default=4, help="workers when the tool starts the app (default 4)")
    target.add_argument("--max-requests", type=int, default=0, help="recycle workers after this many requests")
    target.add_argument("--worker-class", "-k", metavar="CLASS", help="gunicorn worker class (sync, gthread, gevent …)")
    target.add_argument(
        "--gunicorn-args",
        default="",
        metavar="ARGS",
        help='more gunicorn arguments, shell-quoted: --gunicorn-args="--threads 4 --preload" (win over all else)',
    )
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
    load.add_argument(
        "--request",
        action="append",
        metavar="METHOD:PATH[=ROUTE][*WEIGHT]",
        help="drive your own app instead of the gateway: e.g. --request GET:/hello "
        "--request 'GET:/items/{n}=/items/<item_id>*3' ({n}: a number per request; ROUTE: its route label)",
    )
    load.add_argument("--seed", type=int, default=1, help="seed of the request mix")
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    out.add_argument("--no-progress", action="store_true", help="no live progress line on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run promfork-load; the exit status says whether /metrics agreed (0), disagreed (1) or no run was made (2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        mix = CustomMix([parse_request(r) for r in args.request], args.seed) if args.request else None
        weights = parse_mix(args.mix)
    except ValueError as exc:
        parser.error(f"--request: {exc}" if args.request else f"--mix: {exc}")
    gateway = mix is None
    if args.concurrency < 1 or (args.requests is not None and args.requests < 1):
        parser.error("--concurrency and --requests must be positive")
    if args.url and (args.kill_workers_every is not None or args.hup_every is not None):
        parser.error("--kill-workers-every and --hup-every need the tool to start the app (no --url)")
    if args.url and (args.worker_class or args.gunicorn_args):
        parser.error("--worker-class and --gunicorn-args need the tool to start the app (no --url)")
    try:
        gunicorn_args = shlex.split(args.gunicorn_args)
        check_gunicorn_args(gunicorn_args)
    except ValueError as exc:
        parser.error(f"--gunicorn-args: {exc}")
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        print("promfork-load needs aiohttp: pip install 'promfork[load]'", file=sys.stderr)
        return 2
    total = args.requests if args.requests is not None else (None if args.duration else 2000)
    load = Load(mix or RequestMix(weights, args.seed), args.concurrency, total, args.duration)

    server = None
    agreed = False
    try:
        if args.url:
            target = Target(args.url.rstrip("/"))
            metrics_url = args.metrics_url or target.url + "/metrics"
        else:
            server = GunicornServer(
                args.config,
                workers=args.workers,
                max_requests=args.max_requests,
                worker_class=args.worker_class,
                gunicorn_args=gunicorn_args,
                env={"MOCK_LATENCY_MS": str(args.mock_latency_ms)},
            ).start()
            target = Target(server.base_url, started=True, worker_class=server.worker_class())
            metrics_url = args.metrics_url or server.metrics_url
        tally = Tally()
        disruption = Disruption(server, args.kill_workers_every, args.hup_every)
        progress = not args.no_progress and sys.stderr.isatty()
        try:
            before = scrape(metrics_url, args.token)
            elapsed = run(target.url, load, tally, disruption, metrics_url=metrics_url, token=args.token,
                          progress=progress)  # fmt: skip
            _, rows = settle(metrics_url, args.token, tally, before, gateway=gateway)
        except OSError as exc:
            print(f"promfork-load: cannot reach {metrics_url}: {exc}", file=sys.stderr)
            return 2
        agreed = all(r.ok for r in rows)
    except ServerError as exc:
        print(f"promfork-load: {exc}", file=sys.stderr)
        return 2
    finally:
        kept = server.stop(keep_log=not agreed) if server is not None else None
        if kept:
            print(f"promfork-load: server log kept: {kept}", file=sys.stderr)
    target.server_log = kept
    print_report(tally, elapsed, rows, target)
    if args.json:
        write_json(args.json, json_report(tally, elapsed, rows, target))
    return 0 if agreed else 1


if __name__ == "__main__":
    sys.exit(main())
