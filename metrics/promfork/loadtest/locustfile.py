"""Locust users for the gateway, sending the same request mix as promfork-load, and the same token check.

    pip install 'promfork[load]'
    locust -f metrics/promfork/loadtest/locustfile.py --host http://127.0.0.1:8000

Every user adds up the usage its answers reported. When the test stops, the
change in /metrics (``--metrics-url``, default the host's /metrics) is compared
with it: GenAI input, output, cached and reasoning tokens, and cost at the
configured prices (promfork.loadtest.prices). Exact, except for the requests
Locust abandoned in flight when it stopped its users: the server may have
served them, so each may add up to the largest amount an answer of its kind
carried. A mismatch sets the exit code to 1. Run it without disruption;
promfork-load does the kill-aware check.
"""

from __future__ import annotations

import itertools

from locust import FastHttpUser, events, task

from promfork.loadtest.driver import read_usage
from promfork.loadtest.mix import RequestMix
from promfork.loadtest.prices import configured_prices, request_cost
from promfork.loadtest.scrape import Samples, metric_sum, scrape
from promfork.loadtest.tally import Outcome
from promfork.loadtest.verdict import AMOUNTS, COST, ROUNDING

_seeds = itertools.count(1)
_received: list[Outcome] = []  # answers received whole (usage known), over all users of this process
_pending: dict[int, str] = {}  # requests sent and not yet answered (id -> kind): in doubt when the test stops
_before: dict[str, Samples] = {}


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--metrics-url", default="", help="the gateway's /metrics (default: the host's /metrics)")
    parser.add_argument("--metrics-token", default="", help="bearer token for /metrics (METRICS_AUTH_TOKEN)")


def _metrics(environment) -> tuple[str, str | None]:
    options = environment.parsed_options
    url = (options.metrics_url if options else "") or environment.host.rstrip("/") + "/metrics"
    return url, (options.metrics_token if options else "") or None


@events.test_start.add_listener
def _scrape_before(environment, **_kwargs) -> None:
    _received.clear()
    _pending.clear()
    _before["samples"] = scrape(*_metrics(environment))


@events.test_stop.add_listener
def _check_totals(environment, **_kwargs) -> None:
    after = scrape(*_metrics(environment))
    before = _before.get("samples", {})
    prices = configured_prices()
    rows = [(what, metric, labels, amount) for what, metric, labels, amount in AMOUNTS]
    rows.append((COST, COST, {}, lambda o: request_cost(prices, o.model, o.prompt_tokens, o.cached_tokens,
                                                        o.completion_tokens)))  # fmt: skip
    failed = False
    abandoned = list(_pending.values())
    print(f"{len(_received)} answers received whole, {len(abandoned)} abandoned in flight when Locust stopped")
    for what, metric, labels, amount in rows:
        client = sum(amount(o) for o in _received)
        largest: dict[str, float] = {}
        for o in _received:
            largest[o.kind] = max(largest.get(o.kind, 0), amount(o))
        allowed = sum(largest.get(kind, 0) for kind in abandoned)
        measured = metric_sum(after, metric, **labels) - metric_sum(before, metric, **labels)
        slack = ROUNDING * client + 1e-12
        ok = client - slack <= measured <= client + allowed + slack
        failed |= not ok
        print(f"{what:<60} client {client:>16.6f}  metrics {measured:>16.6f}  allowed +{allowed:<10g} "
              f"{'ok' if ok else 'MISMATCH'}")  # fmt: skip
    if failed:
        environment.process_exit_code = 1


class GatewayUser(FastHttpUser):
    """One simulated client drawing from the shared request mix."""

    def on_start(self) -> None:
        self.mix = RequestMix(seed=next(_seeds))

    @task
    def send(self) -> None:
        spec = self.mix.next()
        headers = {"Content-Type": "application/json"} if spec.body is not None else {}
        token = object()
        _pending[id(token)] = spec.kind  # left there if Locust kills this user mid-request
        with self.client.request(
            spec.method, spec.path, data=spec.body, headers=headers, name=spec.kind, catch_response=True
        ) as resp:
            del _pending[id(token)]
            if resp.status_code != spec.status:
                resp.failure(f"{spec.kind}: expected {spec.status}, got {resp.status_code}")
                return
            outcome = Outcome(spec.kind, spec.method, spec.route, spec.status, 0.0, model=spec.model)
            outcome.status = resp.status_code
            read_usage(outcome, spec, resp.content or b"")
            if not outcome.complete:
                resp.failure(f"{spec.kind}: the answer was not whole (usage missing or cut short)")
                return
            _received.append(outcome)
            resp.success()
