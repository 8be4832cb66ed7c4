"""examples/otel-app under real Gunicorn: OpenTelemetry's Flask and OpenAI instrumentations, recorded through
promfork.otel, exact across workers under --max-requests churn and a kill -9.

The OpenAI client calls this repository's gateway (its mock provider) as the upstream; the token sums
the instrumentation reports must equal the usage the upstream returned to the requests the client received.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.checks import assert_config_wires_every_hook
from tests.support.client import counter_samples, request, scrape, value
from tests.support.exactness import CUT
from tests.support.servers import ROOT, Gunicorn, wait_until

OTEL_APP = ROOT / "examples" / "otel-app"
REQUESTS = 600


def test_otel_example_config_is_short_and_wires_every_hook():
    assert_config_wires_every_hook(OTEL_APP / "gunicorn.conf.py")


def otel_app(tmp_path: Path, upstream_port: int) -> Gunicorn:
    env = {
        "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
        "OPENAI_API_KEY": "test-key",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "otel-app-metrics"),  # not the upstream gateway's
    }
    server = Gunicorn(tmp_path, "--max-requests", "40", "--max-requests-jitter", "10", env=env, workers=3)
    config = server.argv.index("gunicorn.conf.py")
    server.argv[config] = str(OTEL_APP / "gunicorn.conf.py")
    server.argv += ["--chdir", str(OTEL_APP)]
    return server


@pytest.mark.integration
def test_flask_and_openai_instrumentations_are_exact_under_churn_and_kill_9(gunicorn_factory, tmp_path: Path):
    upstream = gunicorn_factory(workers=2)
    server = otel_app(tmp_path, upstream.port).start()
    try:
        before = scrape(server.port)
        lock = threading.Lock()
        got = {"hello": 0, "ask": 0, "input": 0, "output": 0, "cut_hello": 0, "cut_ask": 0}
        largest = {"input": 0, "output": 0}
        killed: list[int] = []

        def one(i: int) -> None:
            ask = i % 3 == 0
            try:
                if ask:
                    status, _, body = request("POST", server.port, "/ask", {"question": f"what is {i} * {i}?"})
                else:
                    status, _, body = request("GET", server.port, "/hello")
            except CUT:
                with lock:
                    got["cut_ask" if ask else "cut_hello"] += 1
                return
            assert status == 200, body[:300]
            with lock:
                got["ask" if ask else "hello"] += 1
                if ask:
                    usage = json.loads(body)
                    got["input"] += usage["prompt_tokens"]
                    got["output"] += usage["completion_tokens"]
                    largest["input"] = max(largest["input"], usage["prompt_tokens"])
                    largest["output"] = max(largest["output"], usage["completion_tokens"])
            if i == REQUESTS // 2:
                victim = server.worker_pids()[0]
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(REQUESTS)))
        assert killed and wait_until(lambda: killed[0] not in server.worker_pids(), 20)
        assert server.log().count("Booting worker") >= 3 + 5, "workers were not recycled during the load"

        def delta(families: dict, name: str, **labels: str) -> float:
            return value(families, name, **labels) - value(before, name, **labels)

        def settled() -> dict | None:
            after = scrape(server.port)
            hellos = delta(after, "http_server_request_duration_seconds_count", http_route="/hello",
                           http_response_status_code="200")  # fmt: skip
            return after if got["hello"] <= hellos <= got["hello"] + got["cut_hello"] else None

        after = wait_until(settled, 20)
        assert after, f"OTel's Flask instrumentation does not count what the client received: {got}"
        asks = delta(after, "http_server_request_duration_seconds_count", http_route="/ask")
        assert got["ask"] <= asks <= got["ask"] + got["cut_ask"], (asks, got)
        # The OpenAI instrumentation: the upstream's usage, summed over every worker, dead ones included.
        for token_type in ("input", "output"):
            tokens = delta(after, "gen_ai_client_token_usage_sum", gen_ai_token_type=token_type)
            allowance = got["cut_ask"] * largest[token_type]
            assert got[token_type] <= tokens <= got[token_type] + allowance, (token_type, tokens, got)
        calls = delta(after, "gen_ai_client_operation_duration_seconds_count", gen_ai_operation_name="chat")
        assert got["ask"] <= calls <= got["ask"] + got["cut_ask"]
        # An up-down counter is a current state: back to 0 once idle, whatever worker died meanwhile.
        assert value(after, "http_server_active_requests") == 0
        assert set(counter_samples(before)) <= set(counter_samples(after))
    finally:
        server.stop()
    assert "Traceback" not in server.log(), server.log()[-3000:]
