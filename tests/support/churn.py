"""The churn + kill -9 scenario: load a server whose workers --max-requests keeps recycling, kill -9 one mid-run.

The worker-model tests run it against every way the app can be served (the gateway
under gevent, the Flask example, the FastAPI example under each ASGI worker). The
server's own --max-requests makes the churn; the caller's ``send`` sends one request
and records it in the tally (``Tally.answered``, or ``Tally.cut`` when the connection
was cut). What the totals must be is then judged by the caller with
``exactness.mismatches``, from the scrape before the load (``ChurnRun.before``) and one
after it (``exactness.scrape_when_compacted``).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tests.support.checks import assert_never_decreases
from tests.support.client import scrape
from tests.support.exactness import Scraper, Tally, kill_a_worker


@dataclass
class ChurnRun:
    """What one run saw."""

    tally: Tally  # what the client received whole, and what was in doubt
    before: dict  # the scrape taken before the load
    victim: int  # the worker that died of the SIGKILL
    snapshots: list[dict]  # counter samples of every scrape during the load, in order


def churn_and_kill(
    server,
    send: Callable[[Tally, int], None],
    *,
    clients: int,
    requests: int | None = None,
    seconds: float | None = None,
) -> ChurnRun:
    """Send numbered requests from `clients` threads while scraping; kill -9 one worker halfway.

    ``send(tally, i)`` sends request ``i`` and records it in ``tally``. With `requests`,
    requests 0 … requests-1 are sent and the worker is killed once request
    ``requests // 2`` is done (or after 120 s); with `seconds`, every client sends
    requests back to back until the time is up, and the worker is killed at half time.
    The victim is chosen by ``exactness.kill_a_worker``: it died of the signal, with no
    exit note. Checked here, as every run must hold: no problem noted in the tally,
    every scrape answered (one cut by the kill is only counted), at least 10 scrapes,
    and no counter sample ever decreased from one scrape to the next.
    """
    if (requests is None) == (seconds is None):
        raise ValueError("give either requests or seconds")
    tally = Tally()
    before = scrape(server.port)
    with Scraper(server.port) as scraper, ThreadPoolExecutor(max_workers=clients) as pool:
        if requests is not None:
            halfway = threading.Event()

            def one(i: int) -> None:
                send(tally, i)
                if i == requests // 2:
                    halfway.set()

            results = [pool.submit(one, i) for i in range(requests)]
            halfway.wait(timeout=120)
        else:
            numbers = itertools.count()
            deadline = time.monotonic() + seconds

            def client() -> None:
                while time.monotonic() < deadline:
                    send(tally, next(numbers))

            results = [pool.submit(client) for _ in range(clients)]
            time.sleep(seconds / 2)
        victim = kill_a_worker(server)  # mid-run: the other workers keep serving
        for result in results:
            result.result()
    assert not tally.problems, tally.problems[:5]
    assert not scraper.errors, scraper.errors[:5]
    assert len(scraper.snapshots) >= 10
    assert_never_decreases(scraper.snapshots)
    return ChurnRun(tally, before, victim, scraper.snapshots)
