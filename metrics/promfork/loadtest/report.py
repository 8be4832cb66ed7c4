"""The report of a run: the text table on stdout and the JSON document (--json).

Both show the same facts: throughput and latency as the client measured them, the
load generator's own CPU, the server it ran against, the requests in doubt, and
the verdict rows.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass

from promfork.loadtest.tally import Tally
from promfork.loadtest.verdict import Row, in_doubt


@dataclass
class Target:
    """What the load went to: its URL, and when promfork-load started it, the worker class and kept log."""

    url: str
    started: bool = False  # gunicorn started by promfork-load (else a running URL)
    worker_class: str | None = None
    server_log: str | None = None  # kept because the run disagreed or failed


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of `values`; nan when there are none."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1]


def client_capacity(tally: Tally) -> float:
    """Requests per CPU-second of the load generator itself: its ceiling on a core of its own."""
    return len(tally.outcomes) / tally.client_cpu_s if tally.client_cpu_s > 0 else float("inf")


def _latencies(tally: Tally) -> list[float]:
    return [o.ended - o.started for o in tally.outcomes if o.complete]


def _by_kind(outcomes) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(Counter(o.kind for o in outcomes).items()))


def _amount(value: float) -> str:
    """A count as a whole number, an amount of money (or any fraction) with 6 decimals."""
    return f"{value:>12,.0f}" if float(value).is_integer() or math.isinf(value) else f"{value:>12.6f}"


def print_report(tally: Tally, elapsed: float, rows: list[Row], target: Target) -> None:
    """The human-readable report and verdict, on stdout."""
    done = tally.outcomes
    latencies = _latencies(tally)
    doubt = in_doubt(tally)
    print(f"\nsent {len(done):,} requests in {elapsed:.1f}s: {len(done) / elapsed:,.0f} req/s ({_by_kind(done)})")
    if target.started:
        print(f"server: gunicorn started by promfork-load, worker class {target.worker_class or 'unknown'}")
    else:
        print(f"server: {target.url} (started elsewhere)")
    print(f"latency p50 {percentile(latencies, 50) * 1000:.1f} ms  p90 {percentile(latencies, 90) * 1000:.1f} ms  "
          f"p99 {percentile(latencies, 99) * 1000:.1f} ms   failed {len(tally.failed())}   "
          f"workers killed {len(tally.kills)}  reloads {tally.reloads}  "
          f"in doubt {len(doubt)}" + (f" ({_by_kind(doubt)})" if doubt else ""))  # fmt: skip
    busy = tally.client_cpu_s / elapsed if elapsed > 0 else 0.0
    print(f"load generator: {tally.client_cpu_s:.2f} CPU-s, {busy:.0%} of one core; it could drive about "
          f"{client_capacity(tally):,.0f} req/s with a core of its own")  # fmt: skip
    if busy > 0.9:
        print("  (it used most of a core: the load generator, not the server, may be what limits the rate)")
    width = max(len(r.what) for r in rows)
    print(f"\n{'check':<{width}}  {'client':>12}  {'metrics':>12}  {'allowed':>8}  verdict")
    for r in rows:
        allowed = "exact" if not r.tolerance else "any" if math.isinf(r.tolerance) else f"+{r.tolerance:.6g}"
        verdict = "ok" if r.ok else "MISMATCH"
        print(f"{r.what:<{width}}  {_amount(r.client)}  {_amount(r.metrics)}  {allowed:>8}  {verdict}")
    verdict = "all totals agree" if all(r.ok for r in rows) else "METRICS DISAGREE WITH WHAT WAS SERVED"
    print(f"\nverdict: {verdict}")
    if target.server_log:
        print(f"server log kept: {target.server_log}")


def json_report(tally: Tally, elapsed: float, rows: list[Row], target: Target) -> dict:
    """The whole report as a JSON-ready dict (a row without an upper bound has tolerance null)."""
    doubt = in_doubt(tally)
    checks = [asdict(r) for r in rows]
    for check in checks:
        if math.isinf(check["tolerance"]):
            check["tolerance"] = None
    return {
        "elapsed_s": elapsed,
        "requests": len(tally.outcomes),
        "rate_per_s": len(tally.outcomes) / elapsed,
        "client_cpu_s": tally.client_cpu_s,
        "client_rate_per_cpu_s": client_capacity(tally),
        "target": target.url,
        "worker_class": target.worker_class,
        "server_log": target.server_log,
        "kills": len(tally.kills),
        "reloads": tally.reloads,
        "failed": len(tally.failed()),
        "in_doubt": len(doubt),
        "in_doubt_by_kind": dict(Counter(o.kind for o in doubt)),
        "latency_ms": {f"p{q}": percentile(_latencies(tally), q) * 1000 for q in (50, 90, 99)},
        "by_kind_status": {
            f"{k} {s}": n
            for (k, s), n in Counter((o.kind, o.status if o.complete else None) for o in tally.outcomes).items()
        },
        "checks": checks,
        "went_backwards": tally.went_backwards[:100],
        "agree": all(r.ok for r in rows),
    }


def write_json(path: str, report: dict) -> None:
    """Write `report` to `path`."""
    with open(path, "w") as out:
        json.dump(report, out, indent=2)
