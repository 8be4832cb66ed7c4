"""However many metric objects a process holds for one series, each update counts once (real Gunicorn)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.client import request, scrape, value

pytestmark = pytest.mark.integration

REQUESTS = 400


@pytest.mark.parametrize("workers,churn", [(1, []), (3, ["--max-requests", "25", "--max-requests-jitter", "5"])])
def test_two_apps_and_a_counter_declared_twice_count_every_request_once(gunicorn_factory, workers, churn):
    server = gunicorn_factory("--pythonpath", "tests/apps", *churn, "shared_series:app", workers=workers)

    def hello(i: int) -> int:
        return request("GET", server.port, "/inner/hello" if i % 2 else "/hello")[0]

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(hello, range(REQUESTS)))
    served = statuses.count(200)
    assert served == REQUESTS, statuses  # no worker is killed here: every request is answered

    families = scrape(server.port)
    assert value(families, "http_requests_total", route="/hello", status="200") == served
    assert value(families, "example_hellos_total") == served
    assert value(families, "http_request_duration_seconds_count", route="/hello") == served
