"""Exact totals while workers are killed: the client's own tally, the requests in doubt, scrapes that survive a kill.

A request whose response the client received whole must be counted; a request
the client saw fail (connection cut by a kill -9) may or may not have been
counted before the worker died. So each row of ``http_requests_total`` (and each
custom amount, like tokens) must land between what the client received and that
plus what was in doubt *for that row*: a request in doubt widens only the row it
would have landed in, so a lost or doubled response still fails the check.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from promfork.directory import filenames
from tests.support.client import counter_samples, samples, scrape
from tests.support.servers import wait_until

Row = tuple[str, str, str]  # (method, route, status)
CUT = (OSError, http.client.HTTPException)  # what a client sees when the worker serving it is killed


class Tally:
    """What the client received whole, and what is in doubt, per HTTP row and per named amount."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: Counter[Row] = Counter()
        self.in_doubt: Counter[Row] = Counter()
        self.amounts: Counter[str] = Counter()  # e.g. items viewed, prompt tokens: received whole
        self.amounts_in_doubt: Counter[str] = Counter()
        self.problems: list[str] = []

    def answered(self, row: Row, **amounts: float) -> None:
        """A response received whole: it landed in `row` and carried `amounts`."""
        with self.lock:
            self.received[row] += 1
            self.amounts.update(amounts)

    def cut(self, row: Row, **amounts: float) -> None:
        """A request that failed on the wire: it would have landed in `row` with `amounts`, if counted at all."""
        with self.lock:
            self.in_doubt[row] += 1
            self.amounts_in_doubt.update(amounts)

    def problem(self, message: str) -> None:
        with self.lock:
            self.problems.append(message)


def http_rows(families: dict) -> dict[Row, float]:
    """``http_requests_total`` by (method, route, status)."""
    rows = {}
    for key, v in samples(families, "http_requests_total").items():
        labels = dict(key)
        rows[(labels["method"], labels["route"], labels["status"])] = v
    return rows


def mismatches(tally: Tally, before: dict, after: dict, amounts: dict[str, float]) -> list[str]:
    """Rows and amounts outside [received, received + in doubt]; `before`/`after` are scrapes around the load.

    `amounts` maps each of the tally's amount names to its total in `after`
    minus `before` (the caller knows which metric each one is).
    """
    base, now = http_rows(before), http_rows(after)
    out = []
    for row in sorted(set(now) | set(tally.received) | set(tally.in_doubt)):
        got = now.get(row, 0.0) - base.get(row, 0.0)
        low, high = tally.received[row], tally.received[row] + tally.in_doubt[row]
        if not low <= got <= high:
            out.append(f"http_requests_total{row}: {got} not in [{low}, {high}]")
    for name, got in amounts.items():
        low, high = tally.amounts[name], tally.amounts[name] + tally.amounts_in_doubt[name]
        if not low <= got <= high:
            out.append(f"{name}: {got} not in [{low}, {high}]")
    return out


class Scraper(threading.Thread):
    """Scrapes /metrics in a loop and keeps every counter-type sample; a scrape cut by a kill is only counted."""

    def __init__(self, port: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.interval = interval
        self.stop = threading.Event()
        self.snapshots: list[dict] = []
        self.cut = 0
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.snapshots.append(counter_samples(scrape(self.port)))
            except CUT:
                self.cut += 1
            except Exception as exc:  # a bad status or an unparsable exposition: asserted on by the test
                self.errors.append(repr(exc))
            self.stop.wait(self.interval)

    def __enter__(self) -> Scraper:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        self.join()


def kill_9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def kill_a_worker(server, attempts: int = 5) -> int:
    """kill -9 a live worker of `server` (a servers.Gunicorn); return its pid once the master reaped it as killed.

    Under --max-requests a worker may be on its way out already: it has left its
    exit note (``<pid>.exit``, promfork.gunicorn.worker_exit), so promfork rightly
    counts a ``max_requests`` exit even if the signal lands. Such workers are
    not picked, and a pick that still did not die of the signal is retried: the
    caller knows exactly one worker died of SIGKILL with no exit note.
    """
    for _ in range(attempts):
        live = set(server.worker_pids())
        booted = [int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", server.log())]
        youngest_first = [pid for pid in reversed(booted) if pid in live]
        victim = next((pid for pid in youngest_first if not (server.multiproc_dir / f"{pid}.exit").exists()), None)
        if victim is None:
            time.sleep(0.05)
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
        if wait_until(lambda: f"Worker (pid:{victim}) was sent SIGKILL" in server.log(), timeout=5):  # noqa: B023
            return victim
    raise AssertionError(f"no worker died of SIGKILL in {attempts} attempts")


def file_owners(directory: Path) -> set[str]:
    """Owners of the metric files in `directory`: pids as strings, and ``archive``."""
    names = (p.name for p in directory.glob("*.db"))
    return {f.owner for f in map(filenames.parse_name, names) if f is not None}


def scrape_when_compacted(server, timeout: float = 20, until: Callable[[dict], bool] | None = None) -> dict:
    """The first scrape taken once only live processes (and archives) have metric files, and `until(scrape)`
    holds if given; fails otherwise."""

    def settled():
        fams = scrape(server.port)
        live = {str(server.proc.pid), *map(str, server.worker_pids())}
        compacted = file_owners(server.multiproc_dir) <= live | {filenames.ARCHIVE}
        return fams if compacted and (until is None or until(fams)) else None

    after = wait_until(settled, timeout=timeout, interval=0.2)
    assert after is not None, (
        f"dead workers' files were not compacted{' or `until` never held' if until else ''}: "
        f"{sorted(file_owners(server.multiproc_dir))}"
    )
    return after
