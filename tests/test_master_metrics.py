"""Metrics from the Gunicorn master: METRICS_PORT listener, lifecycle metrics, per-slot process metrics."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time

import pytest

from tests.support.client import chat, request, scrape, value
from tests.support.servers import free_port, wait_until

pytestmark = pytest.mark.integration


def listening_inode(port: int) -> str | None:
    """The socket inode listening on 127.0.0.1:port, from /proc/net/tcp."""
    with open("/proc/net/tcp") as src:
        for line in list(src)[1:]:
            fields = line.split()
            if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
                return fields[9]
    return None


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def test_master_port_serves_the_same_exposition_and_workers_do_not_hold_it(gunicorn_factory):
    mport = free_port()
    server = gunicorn_factory(env={"METRICS_PORT": str(mport), "METRICS_AUTH_TOKEN": "tok"}, workers=3)
    auth = {"Authorization": "Bearer tok"}
    for i in range(30):
        chat(server.port, {"model": "mock-small", "messages": [{"role": "user", "content": f"m{i}"}]})

    assert request("GET", mport, "/metrics")[0] == 401
    assert request("GET", mport, "/metrics", headers={"Authorization": "Bearer nope"})[0] == 401
    via_master = scrape(mport, headers=auth)
    via_worker = scrape(server.port, headers=auth)
    chat_route = {"route": "/v1/chat/completions", "status": "200"}
    assert value(via_master, "http_requests_total", **chat_route) == 30
    assert value(via_worker, "http_requests_total", **chat_route) == 30
    status, headers, _ = request("GET", mport, "/metrics", headers={**auth, "Accept": "application/openmetrics-text"})
    assert status == 200 and headers["content-type"].startswith("application/openmetrics-text")

    # Fork copies every descriptor; post_fork closes the listener right away. Check once
    # every worker is past post_fork (it records its slot file after closing).
    slots = wait_until(
        lambda: {p.name for p in server.multiproc_dir.glob("[0-9]*.slot")} == {"0.slot", "1.slot", "2.slot"}
    )
    assert slots, "workers did not finish booting"
    inode = listening_inode(mport)
    assert inode is not None and inode in socket_inodes(server.proc.pid)
    for pid in server.worker_pids():
        assert inode not in socket_inodes(pid), f"worker {pid} inherited the metrics listener"

    _, _, body = request("GET", mport, "/metrics", headers=auth)
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: apt-get install prometheus"
    check = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def test_master_port_answers_while_every_worker_is_busy(gunicorn_factory):
    mport = free_port()
    server = gunicorn_factory(env={"METRICS_PORT": str(mport), "MOCK_LATENCY_MS": "4000"}, workers=2)
    slow = {"model": "mock-small", "messages": [{"role": "user", "content": "slow"}]}
    busy = [threading.Thread(target=chat, args=(server.port, slow)) for _ in range(4)]
    for t in busy:
        t.start()
    time.sleep(0.5)
    with pytest.raises(TimeoutError):
        request("GET", server.port, "/metrics", timeout=1)  # every worker is stuck in a slow request
    status, _, body = request("GET", mport, "/metrics", timeout=1)
    assert status == 200 and b"http_requests_in_flight 2.0" in body
    for t in busy:
        t.join()


def test_master_port_survives_hup_and_counts_the_reload(gunicorn_factory):
    mport = free_port()
    server = gunicorn_factory(env={"METRICS_PORT": str(mport)}, workers=2)
    old_workers = set(server.worker_pids())
    server.proc.send_signal(signal.SIGHUP)
    replaced = wait_until(lambda: len(set(server.worker_pids()) - old_workers) == 2, timeout=15)
    assert replaced, "HUP did not replace the workers"
    fams = wait_until(lambda: (f := scrape(mport)) and value(f, "gunicorn_master_reloads_total") == 1 and f)
    assert fams, "reload not counted or master port gone after HUP"
    retired = wait_until(lambda: value(scrape(mport), "gunicorn_worker_exits_total", reason="normal") == 2)
    assert retired, "the replaced workers' exits were not counted as normal"


def test_exit_reasons_are_counted_for_real_exits(gunicorn_factory):
    mport = free_port()
    env = {"METRICS_PORT": str(mport), "MOCK_LATENCY_MS": "2500"}
    server = gunicorn_factory("--timeout", "1", "--max-requests", "3", env=env, workers=2)

    # signal: a worker killed outright, as by the OOM killer
    victim = server.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: value(scrape(mport), "gunicorn_worker_exits_total", reason="signal") == 1)

    # timeout: a request that outlives --timeout makes the master abort the worker
    status, _, _ = request("POST", server.port, "/v1/chat/completions", {"model": "mock-small", "messages": [
        {"role": "user", "content": "too slow"}]}, timeout=20)  # fmt: skip
    assert status == 500  # Gunicorn answers the aborted request itself
    assert wait_until(lambda: value(scrape(mport), "gunicorn_worker_exits_total", reason="timeout") >= 1, timeout=15)

    # normal: TTOU asks the master to retire one worker gracefully
    before = value(scrape(mport), "gunicorn_worker_exits_total", reason="normal")
    server.proc.send_signal(signal.SIGTTOU)
    assert wait_until(lambda: value(scrape(mport), "gunicorn_worker_exits_total", reason="normal") == before + 1)
    fams = wait_until(lambda: (f := scrape(mport)) and value(f, "gunicorn_workers_configured") == 1 and f)
    assert fams
    assert wait_until(lambda: value(scrape(mport), "gunicorn_workers") == len(server.worker_pids()) == 1)
    boots = value(scrape(mport), "gunicorn_worker_boots_total")
    assert boots == server.log().count("Booting worker")


def test_max_requests_recycling_is_its_own_exit_reason(gunicorn_factory):
    server = gunicorn_factory("--max-requests", "2", workers=2)
    for i in range(20):
        chat(server.port, {"model": "mock-small", "messages": [{"role": "user", "content": str(i)}]})

    def recycled():
        fams = scrape(server.port)
        return fams if value(fams, "gunicorn_worker_exits_total", reason="max_requests") >= 8 else None

    fams = wait_until(recycled)
    assert fams, "max_requests exits not counted"
    assert value(fams, "gunicorn_worker_exits_total", reason="signal") == 0


def test_process_metrics_use_stable_slots_under_churn(gunicorn_factory):
    server = gunicorn_factory("--max-requests", "1", workers=3)
    for i in range(40):
        chat(server.port, {"model": "mock-small", "messages": [{"role": "user", "content": str(i)}]})
    fams = scrape(server.port)
    slots = {s.labels["worker"] for s in fams["process_resident_memory_bytes"].samples}
    assert "master" in slots
    assert slots <= {"master", "0", "1", "2"}, slots
    assert all(s.value > 1_000_000 for s in fams["process_resident_memory_bytes"].samples)
    assert all(s.value >= 3 for s in fams["process_open_fds"].samples)
