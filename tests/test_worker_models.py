"""Worker models beyond sync and gthread: the gateway under gevent, and Gunicorn 27's dirty worker pools.

Each is run for real, with --max-requests churn and a kill -9, and checked
against what the client received (see tests/support/exactness.py for the in-doubt rule).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.checks import assert_never_decreases
from tests.support.churn import churn_and_kill
from tests.support.client import request, scrape, value
from tests.support.exactness import (
    CUT,
    Scraper,
    Tally,
    file_owners,
    http_rows,
    kill_9,
    mismatches,
    scrape_when_compacted,
)
from tests.support.servers import ExampleServer, free_port, wait_until
from webapp.providers.mock import MockProvider
from webapp.schema import parse_chat_request

CHAT = "/v1/chat/completions"
GATEWAY_ROWS = {
    "plain": ("POST", CHAT, "200"),
    "stream": ("POST", CHAT, "200"),
    "unknown_model": ("POST", CHAT, "404"),
    "models": ("GET", "/v1/models", "200"),
    "model": ("GET", "/v1/models/<model>", "200"),
    "unmatched": ("GET", "unmatched", "404"),
}


def gateway_request(i: int) -> tuple[str, str, str, dict | None]:
    """The i-th request of a fixed mix: (kind, method, path, JSON body)."""
    rng = random.Random(i)
    words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(rng.randint(1, 30)))
    model = rng.choice(["mock-small", "mock-large"])
    roll = rng.random()
    messages = [{"role": "user", "content": words}]
    if roll < 0.35:
        return "plain", "POST", CHAT, {"model": model, "messages": messages}
    if roll < 0.70:
        return "stream", "POST", CHAT, {"model": model, "messages": messages, "stream": True}
    if roll < 0.76:
        return "unknown_model", "POST", CHAT, {"model": f"gpt-{i}", "messages": messages}
    if roll < 0.84:
        return "models", "GET", "/v1/models", None
    if roll < 0.92:
        return "model", "GET", f"/v1/models/{model}", None
    return "unmatched", "GET", f"/no/such/path/{i}", None


def usage_of(body: dict) -> tuple[int, int]:
    """(prompt, completion) tokens the mock provider reports for `body`: what a request in doubt may have counted."""
    chat = parse_chat_request(json.dumps(body).encode())
    completion = MockProvider().complete(chat, chat.messages)
    return completion.prompt_tokens, completion.completion_tokens


def send_gateway_request(port: int, i: int, tally: Tally) -> None:
    kind, method, path, body = gateway_request(i)
    row = GATEWAY_ROWS[kind]
    tokens = usage_of(body) if kind in ("plain", "stream") else (0, 0)
    try:
        status, _, raw = request(method, port, path, body, timeout=60)
    except CUT:
        tally.cut(row, prompt=tokens[0], completion=tokens[1])
        return
    usage = None
    if kind == "stream" and status == 200:
        events = [block[len("data: ") :] for block in raw.decode().split("\n\n") if block.startswith("data: ")]
        if events[-1:] != ["[DONE]"] or len(events) < 2:
            tally.problem(f"stream {i} ended without [DONE]: {events[-2:]}")
        else:
            usage = json.loads(events[-2])["usage"]
    elif kind == "plain" and status == 200:
        usage = json.loads(raw)["usage"]
    if usage is not None and (usage["prompt_tokens"], usage["completion_tokens"]) != tokens:
        tally.problem(f"request {i}: usage {usage} differs from the mock's {tokens}")
    usage = usage or {"prompt_tokens": 0, "completion_tokens": 0}
    tally.answered((method, row[1], str(status)), prompt=usage["prompt_tokens"], completion=usage["completion_tokens"])


@pytest.mark.integration
def test_gateway_under_gevent_is_exact_under_churn_and_kill_9(gunicorn_factory):
    # Simulated provider latency keeps many requests in flight in each worker: gevent serves them concurrently.
    server = gunicorn_factory(
        "--worker-class",
        "gevent",
        "--max-requests",
        "60",
        "--max-requests-jitter",
        "20",
        env={"MOCK_LATENCY_MS": "20"},
        workers=3,
    )
    assert "Using worker: gevent" in server.log()
    run = churn_and_kill(
        server, lambda tally, i: send_gateway_request(server.port, i, tally), requests=4000, clients=24
    )
    tally = run.tally
    assert set(tally.received) == set(GATEWAY_ROWS.values()), tally.received
    assert sum(tally.in_doubt.values()) <= 24, f"more requests failed than a kill explains: {tally.in_doubt}"
    assert server.log().count("Booting worker") >= 3 + 1 + 3, "workers were not recycled during the load"

    after = scrape_when_compacted(server)
    assert not list(server.multiproc_dir.glob(f"*_{run.victim}.db"))
    usage = "gen_ai_client_token_usage_sum"
    tokens = {
        kind: value(after, usage, gen_ai_token_type=otel) - value(run.before, usage, gen_ai_token_type=otel)
        for kind, otel in (("prompt", "input"), ("completion", "output"))
    }
    assert mismatches(tally, run.before, after, tokens) == []
    routes = {route for _, route, _ in http_rows(after)}
    assert routes <= {row[1] for row in GATEWAY_ROWS.values()} | {"/healthz"}, routes
    assert value(after, "http_requests_in_flight") == 0
    assert value(after, "llm_streams_active") == 0
    assert value(after, "gunicorn_worker_exits_total", reason="signal") == 1
    assert "Traceback" not in server.log(), server.log()[-3000:]


def test_gevent_worker_keeps_updating_metrics_when_a_value_cannot_be_stored(tmp_path: Path):
    directory = tmp_path / "mp"
    directory.mkdir(mode=0o700)
    workload = Path(__file__).with_name("gevent_workload.py")
    done = subprocess.run(
        [sys.executable, str(workload), str(directory)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == ["bound child", "new series"]


DIRTY_POOL = Path(__file__).parent / "dirty_pool"
DIRTY_ROW_OK = ("POST", "/dirty", "200")
DIRTY_ROW_FAILED = ("POST", "/dirty", "503")


class DirtyCalls:
    """Calls to tests/dirty_pool's /dirty route: which dirty worker served each, and which failed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.lock = threading.Lock()
        self.served_by: Counter[int] = Counter()
        self.failed = 0
        self.other: list[str] = []

    def call(self, _: int = 0) -> None:
        status, _, raw = request("POST", self.port, "/dirty", timeout=60)
        with self.lock:
            if status == 200:
                self.served_by[json.loads(raw)["pid"]] += 1
            elif status == 503:
                self.failed += 1
            else:
                self.other.append(f"{status} {raw[:200]!r}")

    @property
    def ok(self) -> int:
        return sum(self.served_by.values())


def dirty_worker_pids(server) -> list[int]:
    """The dirty arbiter's children: Gunicorn forks it from the master, and it forks the dirty workers."""
    arbiters = [int(pid) for pid in re.findall(r"Spawned dirty arbiter \(pid: (\d+)\)", server.log())]
    path = Path(f"/proc/{arbiters[-1]}/task/{arbiters[-1]}/children")
    return [int(pid) for pid in path.read_text().split()] if path.exists() else []


@pytest.mark.integration
def test_dirty_worker_metrics_are_aggregated_and_a_killed_dirty_worker_is_compacted_promptly(tmp_path: Path):
    # On a fresh start Gunicorn kills the dirty arbiter named in /tmp/gunicorn-dirty-<proc_name>.pid: keep ours unique.
    name = f"dirty-pool-{os.getpid()}-{tmp_path.name}"
    server = ExampleServer(DIRTY_POOL, tmp_path, "--name", name, "--max-requests", "40", workers=2)
    with server:
        assert wait_until(lambda: len(dirty_worker_pids(server)) == 2, timeout=20), server.log()
        before = scrape(server.port)
        assert value(before, "dirty_calls_total") == 0
        calls = DirtyCalls(server.port)
        with Scraper(server.port) as scraper:
            # Phase 1: both dirty workers serve; every call is counted once, in the dirty worker's own file.
            with ThreadPoolExecutor(max_workers=6) as pool:
                list(pool.map(calls.call, range(300)))
            assert calls.failed == 0 and not calls.other, (calls.failed, calls.other[:3])
            served = set(calls.served_by)
            assert served == set(dirty_worker_pids(server)), (served, dirty_worker_pids(server))
            for pid in served:
                assert (server.multiproc_dir / f"counter_{pid}.db").exists()
            assert value(scrape(server.port), "dirty_calls_total") == 300

            # An idle dirty worker is killed: its files go well before the master's 30 s orphan scan,
            # and every scrape meanwhile shows its calls exactly once.
            victim = min(served)
            killed_at = time.monotonic()
            kill_9(victim)
            seen = []

            def folded():
                seen.append(value(scrape(server.port), "dirty_calls_total"))
                return not list(server.multiproc_dir.glob(f"*_{victim}.db"))

            assert wait_until(folded, timeout=10, interval=0.05), "the killed dirty worker's files were not compacted"
            assert time.monotonic() - killed_at < 10
            assert set(seen) == {300}, f"dirty_calls_total moved while nothing was called: {sorted(set(seen))}"
            assert wait_until(lambda: len(dirty_worker_pids(server)) == 2, timeout=20), "no replacement dirty worker"

            # Phase 2: a dirty worker is killed while calls are in flight: a call that failed may have been counted.
            with ThreadPoolExecutor(max_workers=6) as pool:
                results = [pool.submit(calls.call) for _ in range(300)]
                wait_until(lambda: sum(r.done() for r in results) >= 150, timeout=60)
                second = max(dirty_worker_pids(server))
                kill_9(second)
                for result in results:
                    result.result()
        assert not calls.other, calls.other[:3]
        assert not scraper.errors, scraper.errors[:5]
        assert len(scraper.snapshots) >= 10
        assert_never_decreases(scraper.snapshots)

        def settled():
            fams = scrape(server.port)
            live = {server.proc.pid, *server.worker_pids(), *dirty_worker_pids(server)}
            return fams if file_owners(server.multiproc_dir) <= {*map(str, live), "archive"} else None

        after = wait_until(settled, timeout=10, interval=0.1)
        assert after is not None, f"dead dirty workers' files remain: {sorted(file_owners(server.multiproc_dir))}"
        assert not list(server.multiproc_dir.glob(f"*_{second}.db"))
        calls_counted = value(after, "dirty_calls_total")
        assert calls.ok <= calls_counted <= calls.ok + calls.failed, (calls.ok, calls.failed, calls_counted)
        rows = {row: n - http_rows(before).get(row, 0) for row, n in http_rows(after).items()}
        assert rows.get(DIRTY_ROW_OK) == calls.ok
        assert rows.get(DIRTY_ROW_FAILED, 0) == calls.failed
        assert value(after, "http_requests_in_flight") == 0
        assert value(after, "metrics_compactions_total") >= 2
        assert server.log().count("Booting worker") >= 2 + 10, "HTTP workers were not recycled"
    serving, _, stopping = server.log().partition("Handling signal: term")
    assert "Traceback" not in serving, serving[-3000:]
    # Shutting down, Gunicorn's dirty arbiter may log a client task it cancelled (its own race,
    # in gunicorn/dirty/arbiter.py); any other traceback there is a failure.
    upstream = "dirty/arbiter.py" in stopping and "CancelledError" in stopping and stopping.count("Traceback") == 1
    assert "Traceback" not in stopping or upstream, stopping[-3000:]


def listening_socket_inode(port: int) -> str:
    """The inode of the TCP socket listening on 127.0.0.1:`port` (from /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
            return fields[9]
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def open_sockets(pid: int) -> set[str]:
    """Inodes of the sockets `pid` holds open."""
    links = (os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir())
    return {link[len("socket:[") : -1] for link in links if link.startswith("socket:[")}


@pytest.mark.integration
def test_a_respawned_dirty_arbiter_drops_the_metrics_listener_and_folds_its_predecessor(tmp_path: Path):
    # A dirty arbiter forked after when_ready inherits the master's METRICS_PORT listener and compactor;
    # on_dirty_starting closes the one and replaces the other.
    metrics_port = free_port()
    name = f"dirty-pool-{os.getpid()}-{tmp_path.name}"
    server = ExampleServer(DIRTY_POOL, tmp_path, "--name", name, env={"METRICS_PORT": str(metrics_port)}, workers=2)
    orphans: list[int] = []
    try:
        with server:
            assert wait_until(lambda: len(dirty_worker_pids(server)) == 2, timeout=20), server.log()
            calls = DirtyCalls(server.port)
            for _ in range(20):
                calls.call()
            kill_9(dirty_worker_pids(server)[0])  # the arbiter folds it, and counts that in a file of its own
            first_arbiter = int(re.findall(r"Spawned dirty arbiter \(pid: (\d+)\)", server.log())[-1])
            assert wait_until(lambda: (server.multiproc_dir / f"counter_{first_arbiter}.db").exists(), timeout=10)
            assert wait_until(lambda: len(dirty_worker_pids(server)) == 2, timeout=20)
            for _ in range(20):
                calls.call()
            orphans = dirty_worker_pids(server)  # Gunicorn leaves them running when their arbiter dies
            kill_9(first_arbiter)

            def second_arbiter() -> int | None:
                spawned = [int(p) for p in re.findall(r"Spawned dirty arbiter \(pid: (\d+)\)", server.log())]
                return spawned[-1] if spawned[-1] != first_arbiter and len(dirty_worker_pids(server)) == 2 else None

            arbiter = wait_until(second_arbiter, timeout=20)
            assert arbiter, server.log()[-3000:]
            listener = listening_socket_inode(metrics_port)
            assert listener in open_sockets(server.proc.pid)
            for pid in (arbiter, *dirty_worker_pids(server)):
                assert listener not in open_sockets(pid), f"pid {pid} holds the master's metrics listener"
            # The new arbiter's compactor scans for dead processes as it starts: its predecessor's files go now,
            # not at the master's next 30 s scan, and what they held stays counted.
            assert wait_until(lambda: not list(server.multiproc_dir.glob(f"*_{first_arbiter}.db")), timeout=10)
            # (HTTP workers forked before the respawn still know only the old arbiter's socket, so no more calls.)
            assert calls.failed == 0 and calls.ok == 40
            for port in (server.port, metrics_port):
                families = scrape(port)
                assert value(families, "dirty_calls_total") == 40
                assert value(families, "metrics_compactions_total") >= 1
    finally:
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                kill_9(pid)
        # A dirty arbiter killed outright leaves its socket directory behind.
        for socket_dir in re.findall(r"Spawned dirty arbiter \(pid: \d+\) at (/\S+)/arbiter\.sock", server.log()):
            shutil.rmtree(socket_dir, ignore_errors=True)
