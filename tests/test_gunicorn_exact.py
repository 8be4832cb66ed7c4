"""Real gunicorn, 4 workers recycled by --max-requests, thousands of concurrent requests:
the aggregated /metrics must equal what the client received, and never go backwards."""

from __future__ import annotations

import gzip
import json
import random
import shutil
import subprocess
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from tests.support.checks import assert_never_decreases
from tests.support.client import chat, counter_samples, request, scrape, value
from tests.support.servers import wait_until

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
TOTAL_REQUESTS = 3000


def make_request(i: int) -> tuple[str, str, object]:
    """The i-th request of a fixed mix: (kind, path, body)."""
    rng = random.Random(i)
    words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(rng.randint(1, 30)))
    model = rng.choice(["mock-small", "mock-large"])
    roll = rng.random()
    if roll < 0.40:
        return "plain", CHAT, {"model": model, "messages": [{"role": "user", "content": words}]}
    if roll < 0.70:
        return "stream", CHAT, {"model": model, "stream": True, "messages": [{"role": "user", "content": words}]}
    if roll < 0.78:
        tools = [{"type": "function", "function": {"name": "calculator"}}]
        expr = f"{rng.randint(1, 99)} * {rng.randint(1, 99)}"
        return "tool", CHAT, {"model": model, "messages": [{"role": "user", "content": expr}], "tools": tools}
    if roll < 0.82:
        return "bad_json", CHAT, b'{"model": "mock-small", "messages": ['
    if roll < 0.86:
        return "unknown_field", CHAT, {"model": model, "messages": [{"role": "user", "content": "x"}], "bogus": 1}
    if roll < 0.90:
        return "unknown_model", CHAT, {"model": f"gpt-{i}", "messages": [{"role": "user", "content": "x"}]}
    return "unmatched", f"/no/such/path/{i}", None


class ClientTally:
    """What the client sent and received, the independent truth the metrics are checked against."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.chat_status: Counter[int] = Counter()
        self.unmatched_status: Counter[int] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.tool_calls = 0
        self.problems: list[str] = []

    def send(self, port: int, i: int) -> None:
        kind, path, body = make_request(i)
        if kind == "unmatched":
            status, _, _ = request("GET", port, path)
            with self.lock:
                self.unmatched_status[status] += 1
            return
        if isinstance(body, bytes):
            status, _, raw = request("POST", port, path, body)
            payload, events = json.loads(raw), []
        else:
            status, payload, events = chat(port, body)
        usage = None
        if kind == "stream" and status == 200:
            usage = events[-2].get("usage") if len(events) >= 2 and events[-1] == "[DONE]" else None
            if usage is None:
                self.problems.append(f"stream {i} ended without usage: {events[-2:]}")
        elif status == 200:
            usage = payload["usage"]
        elif "error" not in (payload or {}):
            self.problems.append(f"request {i} ({kind}) got {status} without an OpenAI error body")
        with self.lock:
            self.chat_status[status] += 1
            if kind == "tool" and status == 200:
                self.tool_calls += 1
            if usage:
                self.prompt_tokens += usage["prompt_tokens"]
                self.completion_tokens += usage["completion_tokens"]


class Scraper(threading.Thread):
    """Scrapes /metrics in a loop during the load and records every counter-type sample."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.snapshots: list[dict] = []
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.snapshots.append(counter_samples(scrape(self.port)))
            except Exception as exc:  # recorded and asserted on, never swallowed
                self.errors.append(repr(exc))
            self.stop.wait(0.05)


def test_totals_equal_what_clients_received_under_worker_recycling(gunicorn_factory):
    server = gunicorn_factory("--max-requests", "120", "--max-requests-jitter", "40", workers=4)
    tally = ClientTally()
    scraper = Scraper(server.port)
    scraper.start()
    with ThreadPoolExecutor(max_workers=24) as pool:
        list(pool.map(lambda i: tally.send(server.port, i), range(TOTAL_REQUESTS)))
    scraper.stop.set()
    scraper.join()

    assert not tally.problems, tally.problems[:5]
    assert not scraper.errors, scraper.errors[:5]
    assert len(scraper.snapshots) >= 10
    assert_never_decreases(scraper.snapshots)
    assert server.log().count("Booting worker") > 4 + 10, "workers were not recycled during the load"
    assert set(tally.chat_status) >= {200, 400, 404}

    def metrics_match():
        fams = scrape(server.port)
        by_status = {
            status: value(fams, "http_requests_total", method="POST", route=CHAT, status=str(status))
            for status in tally.chat_status
        }
        return fams if by_status == dict(tally.chat_status) else None

    families = wait_until(metrics_match, timeout=10)
    assert families is not None, "http_requests_total never matched the client's responses"
    final = scrape(server.port)
    for status, count in tally.chat_status.items():
        assert value(final, "http_requests_total", route=CHAT, status=str(status)) == count
    assert value(final, "http_requests_total", route="unmatched", status="404") == tally.unmatched_status[404]
    assert value(final, "gen_ai_client_token_usage_sum", gen_ai_token_type="input") == tally.prompt_tokens
    assert value(final, "gen_ai_client_token_usage_sum", gen_ai_token_type="output") == tally.completion_tokens
    assert value(final, "llm_tool_executions_total", tool="calculator", status="ok") == tally.tool_calls
    not_found = {"gen_ai_request_model": "other", "error_type": "model_not_found"}
    assert value(final, "gen_ai_server_request_duration_seconds_count", **not_found) == sum(
        1 for i in range(TOTAL_REQUESTS) if make_request(i)[0] == "unknown_model"
    )
    assert value(final, "llm_streams_active") == 0
    assert value(final, "http_requests_in_flight") == 0
    # Raw paths never become label values.
    routes = {s.labels.get("route") for s in final["http_requests"].samples}
    assert routes <= {CHAT, "unmatched", "/healthz"}, routes


HISTOGRAMS = (
    "http_request_duration_seconds",
    "http_request_size_bytes",
    "http_response_size_bytes",
    "gen_ai_client_operation_duration_seconds",
    "gen_ai_client_token_usage",
    "gen_ai_server_time_to_first_token_seconds",
    "gen_ai_server_time_per_output_token_seconds",
)


def as_set(samples) -> set[tuple]:
    return {(s.name, tuple(sorted(s.labels.items())), s.value) for s in samples}


def test_exposition_formats_and_promtool(gunicorn_factory):
    server = gunicorn_factory(workers=2)
    # Several label sets per histogram (method, route; provider, model), spread over both workers.
    for i in range(20):
        model = ("mock-small", "mock-large")[i % 2]
        chat(server.port, {"model": model, "messages": [{"role": "user", "content": f"m{i}"}], "stream": i % 4 < 2})
        request("GET", server.port, "/healthz")
        request("GET", server.port, f"/no/such/path/{i}")
    request("POST", server.port, CHAT, b'{"model": "mock-small", "messages": [')
    chat(server.port, {"model": "gpt-unknown", "messages": [{"role": "user", "content": "x"}]})

    status, headers, body = request("GET", server.port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    text = {f.name: f for f in text_string_to_metric_families(body.decode())}

    status, headers, om = request("GET", server.port, "/metrics", headers={"Accept": "application/openmetrics-text"})
    assert status == 200 and headers["content-type"].startswith("application/openmetrics-text")
    assert om.decode().rstrip().endswith("# EOF")
    openmetrics = {f.name: f for f in parse_openmetrics(om.decode())}  # the whole exposition, to # EOF
    assert "http_requests" in openmetrics
    for name in HISTOGRAMS:
        assert openmetrics[name].type == text[name].type == "histogram", name
        label_sets = {tuple(sorted((k, v) for k, v in s.labels.items() if k != "le")) for s in text[name].samples}
        assert len(label_sets) >= 2, f"{name}: {label_sets}"
        assert as_set(openmetrics[name].samples) == as_set(text[name].samples), name
    routes = {s.labels["route"] for s in openmetrics["http_request_duration_seconds"].samples}
    assert routes >= {CHAT, "/healthz", "unmatched"}

    status, headers, zipped = request("GET", server.port, "/metrics", headers={"Accept-Encoding": "gzip"})
    assert headers.get("content-encoding") == "gzip"
    assert b"http_requests_total" in gzip.decompress(zipped)

    # promtool check metrics (2.42, Debian) reads the 0.0.4 text format only: given OpenMetrics it
    # reports every counter as having no HELP (the family name lacks _total), so only text is checked.
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: apt-get install prometheus (make test does it when run as root)"
    check = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def test_gthread_workers_are_exact_too(gunicorn_factory):
    # Several threads of one process share its metric files.
    server = gunicorn_factory(
        "--worker-class", "gthread", "--threads", "4", "--max-requests", "150", "--max-requests-jitter", "30", workers=2
    )
    tally = ClientTally()
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda i: tally.send(server.port, i), range(1500)))
    assert not tally.problems, tally.problems[:5]

    def settled():
        fams = scrape(server.port)
        counts = {s: value(fams, "http_requests_total", route=CHAT, status=str(s)) for s in tally.chat_status}
        return fams if counts == dict(tally.chat_status) else None

    fams = wait_until(settled)
    assert fams is not None, "gthread totals never matched the client's responses"
    assert value(fams, "gen_ai_client_token_usage_sum", gen_ai_token_type="input") == tally.prompt_tokens
    assert value(fams, "gen_ai_client_token_usage_sum", gen_ai_token_type="output") == tally.completion_tokens
    assert value(fams, "http_requests_in_flight") == 0 and value(fams, "llm_streams_active") == 0
