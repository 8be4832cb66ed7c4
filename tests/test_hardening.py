"""Bad days, for real: kill -9, HUP and USR2 upgrades, damaged files, hostile traffic, access, rate limits."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.checks import assert_never_decreases
from tests.support.client import chat, counter_samples, request, scrape, value
from tests.support.servers import ROOT, clean_env, free_port, wait_until

pytestmark = pytest.mark.integration
CHAT = "/v1/chat/completions"
LOAD = str(Path(sys.executable).with_name("promfork-load"))


def chat_ok(port: int, i: int) -> None:
    status, _, _ = chat(port, {"model": "mock-small", "messages": [{"role": "user", "content": f"n{i}"}]})
    assert status == 200


def served(port: int) -> float:
    return value(scrape(port), "http_requests_total", route=CHAT, status="200")


def test_kill_9_mid_flight_keeps_counters_monotonic_and_totals_within_the_in_doubt_rule(tmp_path: Path):
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [LOAD, "--no-progress", "--workers", "3", "--kill-workers-every", "0.4", "--duration", "6",
         "--concurrency", "24", "--mock-latency-ms", "20", "--mix", "plain=50,stream=50", "--json", str(report)],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    data = json.loads(report.read_text())
    assert proc.returncode == 0, proc.stdout
    assert data["kills"] >= 8
    checks = {c["what"].split(" (")[0]: c for c in data["checks"]}
    assert checks["counters never decreased"]["ok"] and data["went_backwards"] == []
    assert checks["llm_streams_active after the run"]["metrics"] == 0
    assert checks["http_requests_in_flight after the run"]["metrics"] == 0
    ok = checks[f"http_requests_total{{route={CHAT},status=200}}"]
    # The rule: every complete response counted; beyond that, only requests in doubt.
    assert ok["client"] <= ok["metrics"] <= ok["client"] + data["in_doubt"]


def test_hup_and_usr2_upgrade_continue_counting_without_reset(gunicorn_factory, tmp_path: Path):
    pidfile = tmp_path / "gunicorn.pid"
    mport = free_port()
    server = gunicorn_factory("--pid", str(pidfile), env={"METRICS_PORT": str(mport)}, workers=2)
    snapshots = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            # The listener moves between masters during the upgrade: a refused scrape is fine.
            with contextlib.suppress(OSError):
                snapshots.append(counter_samples(scrape(mport)))
            stop.wait(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    new_master = None
    try:
        for i in range(40):
            chat_ok(server.port, i)
        assert wait_until(lambda: served(server.port) == 40)

        old_workers = set(server.worker_pids())
        server.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: not old_workers & set(server.worker_pids()) and len(server.worker_pids()) == 2, 15)
        for i in range(40):
            chat_ok(server.port, i)
        assert wait_until(lambda: served(server.port) == 80), "HUP lost or doubled counts"

        server.proc.send_signal(signal.SIGUSR2)
        new_pidfile = Path(f"{pidfile}.2")
        assert wait_until(lambda: new_pidfile.exists() and new_pidfile.read_text().strip(), 20)
        new_master = int(new_pidfile.read_text())
        children = Path(f"/proc/{new_master}/task/{new_master}/children")
        assert wait_until(lambda: len(children.read_text().split()) == 2, 20)
        # Both masters alive on one directory: the new one must not have wiped it.
        assert server.proc.poll() is None and os.path.exists(f"/proc/{new_master}")
        assert served(server.port) == 80
        for i in range(40):
            chat_ok(server.port, i)
        assert wait_until(lambda: served(server.port) == 120)

        server.proc.send_signal(signal.SIGQUIT)  # retire the old master and its workers
        server.proc.wait(30)
        for i in range(40):
            chat_ok(server.port, i)
        assert wait_until(lambda: served(server.port) == 160), "counts lost across the USR2 upgrade"
        assert wait_until(lambda: value(scrape(mport), "http_requests_total", route=CHAT, status="200") == 160)
    finally:
        stop.set()
        watcher.join()
        if new_master is not None:
            os.kill(new_master, signal.SIGTERM)
            wait_until(lambda: not os.path.exists(f"/proc/{new_master}"), 20)
    assert len(snapshots) > 5
    assert_never_decreases(snapshots)


def test_damaged_files_in_a_live_directory_are_counted_named_and_set_aside(gunicorn_factory):
    server = gunicorn_factory(workers=2)
    for i in range(10):
        chat_ok(server.port, i)
    assert wait_until(lambda: served(server.port) == 10)
    (server.multiproc_dir / "counter_4000001.db").write_bytes(b"\x00\x01" * 3)  # truncated
    (server.multiproc_dir / "histogram_4000002.db").write_bytes(b"")  # zero length
    (server.multiproc_dir / "counter_4000003.db").write_bytes(os.urandom(4096))  # garbage
    (server.multiproc_dir / "backup.db").write_bytes(b"not ours")  # foreign name
    fams = scrape(server.port)
    assert value(fams, "http_requests_total", route=CHAT, status="200") == 10
    assert value(fams, "metrics_scrape_errors_total") == 4
    assert value(scrape(server.port), "metrics_scrape_errors_total") == 4  # set aside once
    log = server.log()
    for name in ("counter_4000001.db", "histogram_4000002.db", "counter_4000003.db", "backup.db"):
        assert name in log
        assert (server.multiproc_dir / "quarantine" / name).exists()


def test_files_are_private(gunicorn_factory):
    server = gunicorn_factory(workers=2)
    chat_ok(server.port, 1)
    assert stat.S_IMODE(server.multiproc_dir.stat().st_mode) & 0o077 == 0
    for path in server.multiproc_dir.glob("*"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o007 == 0, f"{path.name} is world-accessible"


def test_api_keys_guard_the_api_but_never_metrics(gunicorn_factory):
    server = gunicorn_factory(env={"API_KEYS": "k-one,k-two", "METRICS_AUTH_TOKEN": "scrape-me"}, workers=2)
    body = {"model": "mock-small", "messages": [{"role": "user", "content": "hi"}]}
    status, _, raw = request("POST", server.port, CHAT, body)
    assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
    assert request("POST", server.port, CHAT, body, headers={"Authorization": "Bearer nope"})[0] == 401
    assert request("POST", server.port, CHAT, body, headers={"Authorization": "Bearer k-two"})[0] == 200
    assert request("GET", server.port, "/healthz")[0] == 200
    # /metrics has its own token and ignores API keys entirely.
    assert request("GET", server.port, "/metrics", headers={"Authorization": "Bearer k-one"})[0] == 401
    assert request("GET", server.port, "/metrics", headers={"Authorization": "Bearer scrape-me"})[0] == 200


def test_rate_limit_holds_across_all_workers_together(gunicorn_factory):
    rpm = 30
    server = gunicorn_factory(env={"RATE_LIMIT_RPM": str(rpm)}, workers=4)
    body = {"model": "mock-small", "messages": [{"role": "user", "content": "hi"}]}
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: request("POST", server.port, CHAT, body), range(120)))
    elapsed = time.monotonic() - started
    statuses = Counter(status for status, _, _ in results)
    refilled = int(elapsed * rpm / 60) + 1
    # A per-worker limit would let about 4 x 30 through.
    assert rpm <= statuses[200] <= rpm + refilled, statuses
    assert statuses[429] == 120 - statuses[200]
    limited = next(r for r in results if r[0] == 429)
    assert int(limited[1]["retry-after"]) >= 1
    assert json.loads(limited[2])["error"]["code"] == "rate_limit_exceeded"
    assert wait_until(lambda: value(scrape(server.port), "ratelimit_rejected_total", reason="rpm") == statuses[429])
