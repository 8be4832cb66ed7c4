"""The verdict: what the client saw against the change in /metrics, row by row.

When promfork counts a request (promfork.flask): a response with a Content-Length
just before its last byte is handed to the server; a gateway stream just before
its final chunk (``data: [DONE]``), which the gateway announces by calling
``environ["promfork.response_complete"]``; anything else when the server closes
it. The count and the in-flight drop are one update, so a SIGKILL never leaves
half of it. Hence, for every request the client sent:

* **Received whole** (the status and the whole body; for a stream, the usage chunk
  and then [DONE]): *sure*. It was counted exactly once, in the row of its method,
  route and status, with the tokens its usage reports and the tool run it implies.

* **Not received whole** (refused, reset, cut, short of its length, malformed, a
  stream without [DONE]): *in doubt*. A kill before the count took the request
  with it (no row); a kill between the count and the client's last byte left it
  counted (one row). The rows it could have landed in:

  - its own method and route, which the mix declares (/v1/chat/completions, or
    ``unmatched`` for a path the gateway has no rule for);
  - the status the client read in the headers, when it got them: that is the
    status counted. Without headers, any status it could have produced: the one
    the mix expects for it, any status a request of the same kind and the same
    expectation got in this run (a 429 from a rate limit, say), or 500 (a worker
    that Gunicorn aborts on timeout while the app runs counts it as 500 on its way
    out);
  - tokens (input, output, cached input, reasoning) and cost: up to the largest
    amount a completed request of the same kind reported, which is none for kinds
    that never reach the provider (client errors, unknown paths). A kind with no
    completed request to go by gives no upper bound. Cost is the client's usage at
    the configured prices (promfork.loadtest.prices), equal up to float rounding;
  - tool runs: one per tool request in doubt.

Each row then allows exactly the requests in doubt that could have landed in it:
``sure <= metrics <= sure + in doubt for this row``, never below what the client
surely received. Rows come from the client's statuses, the mix's expectations and
every status the metrics show for the mix's routes, so a count that the client
never saw is checked too.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

from promfork.loadtest.mix import CHAT, UNMATCHED
from promfork.loadtest.prices import configured_prices, request_cost
from promfork.loadtest.scrape import Samples, label_values, metric_sum, scrape
from promfork.loadtest.tally import Outcome, Tally

ABORT_STATUS = 500  # what a request counts as when Gunicorn aborts its worker mid-request
ALWAYS_CHECKED = (("POST", CHAT, 200), ("GET", UNMATCHED, 404))
USAGE = "gen_ai_client_token_usage_sum"
COST = "gen_ai_client_cost_usd_total"
# (row, metric, its labels, the amount one request the client received carries)
AMOUNTS = (
    (f"{USAGE}{{gen_ai_token_type=input}}", USAGE, {"gen_ai_token_type": "input"}, lambda o: o.prompt_tokens),
    (f"{USAGE}{{gen_ai_token_type=output}}", USAGE, {"gen_ai_token_type": "output"}, lambda o: o.completion_tokens),
    ("gen_ai_client_cached_input_tokens_total", "gen_ai_client_cached_input_tokens_total", {},
     lambda o: o.cached_tokens),
    ("gen_ai_client_reasoning_tokens_total", "gen_ai_client_reasoning_tokens_total", {},
     lambda o: o.reasoning_tokens),
)  # fmt: skip
ROUNDING = 1e-9  # relative: float sums of cost in another order differ in the last bits


@dataclass
class Row:
    """One line of the verdict table: client truth, the metric's change, what may differ."""

    what: str
    client: float
    metrics: float
    tolerance: float  # how far above `client` the metric may be (0: exact; inf: no upper bound)
    ok: bool
    in_doubt: int = 0  # requests in doubt that could have landed in this row


def in_doubt(tally: Tally) -> list[Outcome]:
    """Requests whose count a kill may have decided either way: those the client did not receive whole."""
    return tally.failed()


def possible_statuses(outcome: Outcome, answered: dict[tuple[str, int], set[int]]) -> set[int]:
    """The statuses a request in doubt may have been counted with.

    `answered` maps (kind, expected status) to the statuses such requests got in this run.
    """
    if outcome.status is not None:
        return {outcome.status}
    return {outcome.expected, ABORT_STATUS} | answered.get((outcome.kind, outcome.expected), set())


def compare(
    tally: Tally,
    before: Samples,
    after: Samples,
    prices: dict[str, dict[str, float]] | None = None,
    gateway: bool = True,
) -> list[Row]:
    """Client truth vs the change in /metrics, row by row (see the module docstring for the rule).

    `prices` (USD per 1M tokens per model) defaults to ``configured_prices()``. With
    `gateway` False (the user's own requests against any app) only the HTTP rows, the
    counters and the in-flight gauge are checked.
    """
    prices = configured_prices() if prices is None else prices
    doubt = in_doubt(tally)
    sure = [o for o in tally.outcomes if o.complete]
    rows: list[Row] = []

    def delta(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    def add(what: str, client: float, measured: float, could: int, tolerance: float, slack: float = 0.0) -> None:
        ok = client - slack <= measured <= client + tolerance + slack
        rows.append(Row(what, client, measured, tolerance, ok, could))

    answered: dict[tuple[str, int], set[int]] = defaultdict(set)
    for o in tally.outcomes:
        if o.status is not None:
            answered[(o.kind, o.expected)].add(o.status)
    sure_rows = Counter((o.method, o.route, o.status) for o in sure)
    doubt_rows: Counter[tuple[str, str, int]] = Counter()
    for o in doubt:
        for status in possible_statuses(o, answered):
            doubt_rows[(o.method, o.route, status)] += 1

    always = ALWAYS_CHECKED if gateway else ()
    routes = list(dict.fromkeys([(m, r) for m, r, _ in always] + [(o.method, o.route) for o in tally.outcomes]))
    checked = set(always) | set(sure_rows)
    for method, route in routes:
        for status in label_values(after, "http_requests_total", "status", method=method, route=route):
            if status.isdigit() and delta("http_requests_total", method=method, route=route, status=status):
                checked.add((method, route, int(status)))
    shared = {r for r in {r for _, r in routes} if sum(1 for _, other in routes if other == r) > 1}
    for method, route in routes:
        for status in sorted(s for m, r, s in checked if (m, r) == (method, route)):
            labels = f"method={method},route={route}" if route in shared else f"route={route}"
            could = doubt_rows[(method, route, status)]
            measured = delta("http_requests_total", method=method, route=route, status=str(status))
            add(f"http_requests_total{{{labels},status={status}}}", sure_rows[(method, route, status)], measured,
                could, could)  # fmt: skip

    if not gateway:
        rows.append(Row(f"counters never decreased ({tally.scrapes} scrapes during the run)", 0,
                        len(tally.went_backwards), 0, not tally.went_backwards))  # fmt: skip
        in_flight = metric_sum(after, "http_requests_in_flight")
        rows.append(Row("http_requests_in_flight after the run", 0, in_flight, 0, in_flight == 0))
        return rows

    def cost(o: Outcome) -> float:
        return request_cost(prices, o.model, o.prompt_tokens, o.cached_tokens, o.completion_tokens)

    for what, metric, labels, amount in (*AMOUNTS, (COST, COST, {}, cost)):
        largest: dict[str, float] = {}
        for o in sure:
            largest[o.kind] = max(largest.get(o.kind, 0), amount(o))
        bounds = [largest.get(o.kind, math.inf) for o in doubt]
        client = sum(amount(o) for o in sure)
        slack = ROUNDING * client if metric == COST else 0.0
        add(what, client, delta(metric, **labels), sum(1 for b in bounds if b), sum(bounds), slack)

    tools_in_doubt = sum(1 for o in doubt if o.kind == "tool")
    add("llm_tool_executions_total{tool=calculator,status=ok}",
        sum(1 for o in sure if o.kind == "tool" and o.status == 200),
        delta("llm_tool_executions_total", tool="calculator", status="ok"), tools_in_doubt, tools_in_doubt)  # fmt: skip

    rows.append(Row(f"counters never decreased ({tally.scrapes} scrapes during the run)", 0,
                    len(tally.went_backwards), 0, not tally.went_backwards))  # fmt: skip
    for gauge in ("llm_streams_active", "http_requests_in_flight"):
        rows.append(Row(f"{gauge} after the run", 0, metric_sum(after, gauge), 0, metric_sum(after, gauge) == 0))
    return rows


def settle(
    url: str, token: str | None, tally: Tally, before: Samples, timeout: float = 15.0, gateway: bool = True
) -> tuple[Samples, list[Row]]:
    """Scrape until the numbers agree or stop changing (workers finish, compaction runs)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        after = scrape(url, token)
        rows = compare(tally, before, after, gateway=gateway)
        if (
            all(r.ok for r in rows)
            or time.monotonic() >= deadline
            or (after == last and time.monotonic() > deadline - timeout + 3)
        ):
            return after, rows
        last = after
        time.sleep(0.25)
