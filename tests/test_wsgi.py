"""promfork.wsgi under real Gunicorn: any WSGI app gets the same series, routes from its own function."""

from __future__ import annotations

import pytest

from promfork.wsgi import PrometheusMiddleware
from tests.support.client import request, scrape, value


def test_route_must_be_a_function():
    with pytest.raises(TypeError, match="route must be a function"):
        PrometheusMiddleware(lambda e, s: [], route="/items/{id}")


@pytest.mark.integration
def test_a_plain_wsgi_app_is_counted_by_route_template(gunicorn_factory):
    server = gunicorn_factory("--pythonpath", "tests/apps", "plain_wsgi:application", workers=2)
    before = scrape(server.port)  # readiness probes of the test helper are requests too
    sent = {("/hello", "200"): 0, ("/items/{id}", "200"): 0, ("/stream", "200"): 0, ("unmatched", "404"): 0}
    for i in range(60):
        path, key = [
            ("/hello", ("/hello", "200")),
            (f"/items/{i}", ("/items/{id}", "200")),
            ("/stream", ("/stream", "200")),
            (f"/nothing/{i}", ("unmatched", "404")),
        ][i % 4]
        status = request("GET", server.port, path)[0]
        assert str(status) == key[1]
        sent[key] += 1
    families = scrape(server.port)
    for (route, status), count in sent.items():
        counted = value(families, "http_requests_total", route=route, status=status)
        assert counted - value(before, "http_requests_total", route=route, status=status) == count, route
    # Counted at response_complete(), right before the final chunk: the bytes sent until then.
    assert value(families, "http_response_size_bytes_sum", route="/stream") == 8 * sent[("/stream", "200")]
    assert value(families, "http_requests_in_flight") == 0
    assert value(families, "http_requests_total", route="/metrics") == 0
