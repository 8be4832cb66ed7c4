"""Hostile traffic against real gunicorn: bounded series, 4xx JSON errors, no crashed worker."""

from __future__ import annotations

import json
import random
import string
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support.client import request, scrape, value
from tests.support.servers import Gunicorn, wait_until

pytestmark = pytest.mark.integration
CHAT = "/v1/chat/completions"
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    gunicorn = Gunicorn(tmp_path_factory.mktemp("hostile"), workers=3).start()
    yield gunicorn
    gunicorn.stop()


def assert_json_4xx(status: int, raw: bytes) -> None:
    assert 400 <= status < 500, (status, raw[:200])
    assert "error" in json.loads(raw), raw[:200]


def test_ten_thousand_random_paths_and_methods_keep_series_bounded(server):
    rng = random.Random(42)
    alphabet = string.ascii_letters + string.digits + "-._~%/"
    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "PROPFIND", "BREW", "X-EVIL"]

    def one(_):
        path = "/" + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        status, _, _ = request(rng.choice(methods), server.port, path)
        return status

    with ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(pool.map(one, range(10_000)))
    assert all(400 <= s < 500 for s in statuses)
    families = scrape(server.port)
    series = {tuple(sorted(s.labels.items())) for s in families["http_requests"].samples}
    assert len(series) <= 50, f"{len(series)} series for http_requests_total"
    assert value(families, "http_requests_total", route="unmatched") >= 9_000


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=JSON_VALUES)
def test_arbitrary_json_bodies_get_a_json_error_never_a_crash(server, body):
    status, _, raw = request("POST", server.port, CHAT, json.dumps(body).encode())
    if status == 200:  # only a valid request may succeed
        assert isinstance(body, dict) and "model" in body and "messages" in body
        return
    assert_json_4xx(status, raw)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=st.text(min_size=1, max_size=300))
def test_random_model_names_are_404_and_labelled_other(server, model):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    status, _, raw = request("POST", server.port, CHAT, body)
    if model in ("mock-small", "mock-large"):
        assert status == 200
        return
    assert status == 404 and json.loads(raw)["error"]["code"] == "model_not_found"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=2000))
@example(raw=b"")
@example(raw=b" \r\n\t")
@example(raw=b"\xff\xfe\x00")
@example(raw=b'{"model": "mock-small", "messages": [')
@example(raw=b"null")
@example(raw=b"[]")
@example(raw=b"{}")
@example(raw=b'{"model": "mock-small"}')
@example(raw=b"[" * 2000)
def test_malformed_bytes_are_a_400(server, raw):
    # Random bytes are never a valid chat request: every one must be refused as the client's mistake.
    status, _, answer = request("POST", server.port, CHAT, raw)
    assert status == 400, (status, raw[:100], answer[:200])
    assert "error" in json.loads(answer), answer[:200]


def test_oversized_deep_and_header_heavy_requests_are_refused(server):
    big = json.dumps({"model": "mock-small", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}).encode()
    status, _, raw = request("POST", server.port, CHAT, big)
    assert status == 413 and "error" in json.loads(raw)
    deep = b"[" * 100_000 + b"]" * 100_000
    status, _, raw = request("POST", server.port, CHAT, deep)
    assert status in (400, 413)
    assert "error" in json.loads(raw)
    # Gunicorn refuses oversized header fields itself, before the app (its own error page).
    status, _, _ = request("GET", server.port, "/healthz", headers={"X-Huge": "h" * 100_000})
    assert 400 <= status < 500


def test_no_worker_crashed_and_metrics_stayed_sane(server):
    fams = wait_until(lambda: (f := scrape(server.port)) and value(f, "http_requests_in_flight") == 0 and f)
    assert fams
    assert "Traceback" not in server.log() and "Exception in worker" not in server.log()
    usage = fams["gen_ai_client_token_usage"].samples + fams["gen_ai_server_request_duration_seconds"].samples
    models = {s.labels.get("gen_ai_request_model") for s in usage}
    assert models <= {"mock-small", "mock-large", "other"}, models
    responses = {s.labels.get("gen_ai_response_model") for s in usage}
    assert responses <= {"mock-small-2025-06-01", "mock-large-2025-06-01", ""}, responses
