"""/metrics methods on a real gunicorn, workers' port and master's METRICS_PORT alike.

HEAD answers with the headers a GET gets (Content-Length of the GET body) and no
body; OPTIONS and every 405 name the same methods in ``Allow``.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from tests.support.client import chat, request
from tests.support.servers import Gunicorn, free_port

pytestmark = pytest.mark.integration

TOKEN = "tok"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OPENMETRICS = {"Accept": "application/openmetrics-text"}
GZIP = {"Accept-Encoding": "gzip"}


@pytest.fixture(scope="module")
def listeners(tmp_path_factory) -> Iterator[dict[str, int]]:
    """Both /metrics listeners of one gunicorn that has served a few routes and statuses."""
    master_port = free_port()
    env = {"METRICS_PORT": str(master_port), "METRICS_AUTH_TOKEN": TOKEN}
    server = Gunicorn(tmp_path_factory.mktemp("exposition"), env=env, workers=2).start()
    try:
        for i in range(3):
            chat(server.port, {"model": "mock-small", "messages": [{"role": "user", "content": f"m{i}"}]})
        request("GET", server.port, "/healthz")
        request("GET", server.port, "/no/such/path")
        yield {"worker": server.port, "master": master_port}
    finally:
        server.stop()


@pytest.fixture(params=["worker", "master"])
def metrics_port(request, listeners) -> int:
    """The workers' port (gunicorn), then the master's METRICS_PORT (wsgiref)."""
    return listeners[request.param]


def methods(header: str) -> list[str]:
    return sorted(m.strip() for m in header.split(","))


def get_head_get(port: int, headers: dict) -> tuple[tuple, tuple]:
    """GET, HEAD, GET in a row until all three announce one length (process metrics move between scrapes).

    A compressed body's length moves with its content even when the text's does not,
    so for gzip only the two GETs must agree.
    """
    for _ in range(100):
        before = request("GET", port, "/metrics", headers=headers)
        head = request("HEAD", port, "/metrics", headers=headers)
        after = request("GET", port, "/metrics", headers=headers)
        lengths = {len(before[2]), len(after[2])}
        if "Accept-Encoding" not in headers:
            lengths.add(int(head[1].get("content-length", -1)))
        if len(lengths) == 1:
            return before, head
    raise AssertionError("GET and HEAD never announced one length for three requests in a row")


@pytest.mark.parametrize("extra", [{}, OPENMETRICS, GZIP, {**OPENMETRICS, **GZIP}], ids=["text", "om", "gzip", "om-gz"])
def test_head_has_the_headers_of_get_and_no_body(metrics_port, extra):
    (status, got, body), (head_status, head, head_body) = get_head_get(metrics_port, {**AUTH, **extra})
    assert status == head_status == 200, body[:300]
    text = (gzip.decompress(body) if "Accept-Encoding" in extra else body).decode()
    parse = parse_openmetrics if "Accept" in extra else parse_text
    assert "http_requests" in {f.name for f in parse(text)}
    assert head_body == b""
    assert got["content-length"] == str(len(body))
    if "Accept-Encoding" in extra:
        # The same length of text can compress to a byte more or less as values change between requests.
        assert int(head["content-length"]) > 0
    else:
        assert head["content-length"] == got["content-length"]
    for name in ("content-type", "content-encoding"):
        assert head.get(name) == got.get(name), name


def test_head_of_the_full_exposition_announces_a_length_and_sends_nothing(metrics_port):
    status, head, body = request("HEAD", metrics_port, "/metrics", headers=AUTH)
    assert status == 200 and body == b""
    assert head["content-type"].startswith("text/plain; version=0.0.4")
    assert int(head["content-length"]) > 0


def test_head_without_the_token_is_refused_like_get(metrics_port):
    get_status, _, _ = request("GET", metrics_port, "/metrics")
    status, head, body = request("HEAD", metrics_port, "/metrics")
    assert status == get_status == 401
    assert body == b"" and head["www-authenticate"].startswith("Bearer")


def test_options_and_every_405_allow_get_head_options(metrics_port):
    status, headers, _ = request("OPTIONS", metrics_port, "/metrics")
    assert status == 200
    assert methods(headers["allow"]) == ["GET", "HEAD", "OPTIONS"]
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, headers, _ = request(method, metrics_port, "/metrics", headers=AUTH)
        assert status == 405, method
        assert methods(headers["allow"]) == ["GET", "HEAD", "OPTIONS"], method


def test_name_filter_answers_only_the_families_asked_for(metrics_port):
    status, _, body = request("GET", metrics_port, "/metrics?name[]=http_requests_total", headers=AUTH)
    assert status == 200
    assert {f.name for f in parse_text(body.decode())} == {"http_requests"}
