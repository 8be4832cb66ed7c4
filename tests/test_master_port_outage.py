"""A slowloris on METRICS_PORT, inside a pids cgroup, never takes the Gunicorn master down.

Each test creates its own pids cgroup (as root) with a small ``pids.max``, runs the server
in it and removes it at the end. The slowloris is bounded (a fixed number of connections
to loopback, held for a few seconds) and closed by the test whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from tests.support.client import request
from tests.support.servers import Gunicorn, free_port, wait_until

pytestmark = pytest.mark.integration

PIDS_MAX = 64
SLOWLORIS_CONNECTIONS = 2000


def pids_hierarchy() -> Path | None:
    """Where a pids cgroup can be made: cgroup v1's pids hierarchy or a v2 root with the controller."""
    v1 = Path("/sys/fs/cgroup/pids")
    if (v1 / "cgroup.procs").exists():
        return v1
    v2 = Path("/sys/fs/cgroup")
    with contextlib.suppress(OSError):
        if "pids" in (v2 / "cgroup.subtree_control").read_text().split():
            return v2
    return None


@pytest.fixture
def pids_cgroup():
    """A new pids cgroup limited to PIDS_MAX tasks; every process left in it is killed at the end."""
    root = pids_hierarchy()
    if os.geteuid() != 0 or root is None:
        if os.environ.get("CI"):
            pytest.fail("this test needs root and a pids cgroup hierarchy")
        pytest.skip("needs root and a pids cgroup hierarchy")
    group = root / f"promfork-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    (group / "pids.max").write_text(str(PIDS_MAX))
    try:
        yield group
    finally:
        for _ in range(50):
            pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        group.rmdir()


def in_cgroup(group: Path, argv: list[str]) -> list[str]:
    """`argv` run as a process that first moves itself into `group`."""
    return ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *argv]


class Slowloris:
    """Up to `count` connections that each send half a request line, then nothing."""

    def __init__(self, port: int, count: int) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, count + 512)), hard))
        self.port, self.count, self.sockets = port, count, []

    def __enter__(self) -> Slowloris:
        deadline = time.monotonic() + 20
        while len(self.sockets) < self.count and time.monotonic() < deadline:
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=1)
                sock.sendall(b"GET /metr")
            except OSError:
                continue
            self.sockets.append(sock)
        return self

    def closed_by_server(self) -> int:
        """How many of the held connections the server has closed."""
        closed = 0
        for sock in self.sockets:
            sock.setblocking(False)
            try:
                closed += sock.recv(4096) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
        return closed

    def __exit__(self, *exc_info) -> None:
        for sock in self.sockets:
            sock.close()


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def scrape_seconds(port: int) -> float:
    started = time.monotonic()
    status, _, _ = request("GET", port, "/metrics", timeout=5)
    assert status == 200
    return time.monotonic() - started


def test_master_keeps_forking_workers_while_a_slowloris_holds_the_metrics_port(tmp_path, pids_cgroup):
    mport = free_port()
    server = Gunicorn(tmp_path, env={"METRICS_PORT": str(mport)}, workers=2)
    server.argv = in_cgroup(pids_cgroup, server.argv)
    server.start()
    try:
        master = server.proc.pid  # `sh` exec'd gunicorn: the same process
        # The master's own threads (main loop, compactor, listener, Gunicorn's control server) come
        # and go a little; a thread per connection would add thousands.
        ceiling = threads(master) + 2
        with Slowloris(mport, SLOWLORIS_CONNECTIONS) as slowloris:
            assert len(slowloris.sockets) == SLOWLORIS_CONNECTIONS
            assert threads(master) <= ceiling
            assert scrape_seconds(mport) < 2.0
            assert scrape_seconds(server.port) < 5.0

            killed = server.worker_pids()[0]
            os.kill(killed, signal.SIGKILL)
            assert wait_until(lambda: killed not in server.worker_pids() and len(server.worker_pids()) == 2, 20)

            before_hup = set(server.worker_pids())
            server.proc.send_signal(signal.SIGHUP)
            assert wait_until(lambda: len(set(server.worker_pids()) - before_hup) >= 2, 30), server.log()[-3000:]

            server.proc.send_signal(signal.SIGTTIN)
            assert wait_until(lambda: len(server.worker_pids()) == 3, 20), server.log()[-3000:]
            assert threads(master) <= ceiling
            assert scrape_seconds(mport) < 2.0

            # The server closes every connection that never sent a whole request, by itself.
            assert wait_until(lambda: slowloris.closed_by_server() == len(slowloris.sockets), 30)
        assert server.proc.poll() is None
        assert "BlockingIOError" not in server.log() and "can't start new thread" not in server.log()
    finally:
        server.stop()


STOCK_SERVER = textwrap.dedent(
    """
    import os, sys, time
    from prometheus_client import start_http_server
    start_http_server(int(sys.argv[1]), addr="127.0.0.1")
    print("ready", flush=True)
    while True:  # what a Gunicorn master does when it replaces a worker
        try:
            pid = os.fork()
        except OSError as exc:
            print("fork failed:", exc, flush=True)
        else:
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        time.sleep(0.2)
    """
)


def test_the_same_slowloris_exhausts_a_thread_per_connection_server(tmp_path, pids_cgroup):
    """The scenario has teeth: prometheus-client's start_http_server (a thread per connection) cannot fork."""
    port = free_port()
    out = tmp_path / "stock.log"
    with open(out, "wb") as log:
        proc = subprocess.Popen(
            in_cgroup(pids_cgroup, [sys.executable, "-c", STOCK_SERVER, str(port)]), stdout=log, stderr=log
        )
    try:
        assert wait_until(lambda: b"ready" in out.read_bytes(), 20)
        with Slowloris(port, PIDS_MAX * 4):
            assert wait_until(lambda: b"fork failed" in out.read_bytes(), 20), out.read_text()
            assert threads(proc.pid) >= PIDS_MAX - 5
    finally:
        proc.kill()
        proc.wait()
