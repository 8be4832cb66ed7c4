"""Gunicorn started as root with --user/--group: unprivileged workers store, read and lock every metric file.

The project runs from a clean virtualenv of the system's Python (readable by the
workers' user), outside the repository, with --daemon, --chdir and --umask as a
deployment would start it. Needs root (CI runs as root).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.client import request, scrape, value
from tests.support.servers import ROOT, clean_env, free_port, wait_until

pytestmark = pytest.mark.integration

SYSTEM_PYTHON = "/usr/bin/python3.11"
REQUESTS = 300


def needs_root() -> None:
    if os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON):
        if os.environ.get("CI"):
            pytest.fail(f"this test needs root and {SYSTEM_PYTHON}")
        pytest.skip(f"needs root and {SYSTEM_PYTHON}")


@pytest.fixture(scope="module")
def public_project() -> Iterator[Path]:
    """A world-readable folder with a venv of the system Python, promfork's wheel installed, the Flask example."""
    needs_root()
    root = Path(tempfile.mkdtemp(prefix="promfork-user-", dir="/tmp"))
    try:
        run = dict(check=True, capture_output=True, text=True, timeout=600)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(root), str(ROOT)], **run)
        (wheel,) = root.glob("promfork-*.whl")
        subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(root / "venv")], **run)
        subprocess.run([str(root / "venv/bin/python"), "-m", "pip", "install", "-q", str(wheel)], **run)
        shutil.copytree(ROOT / "examples" / "flask-app", root / "project")
        subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@contextlib.contextmanager
def daemon(project: Path, port: int, *args: str, env: dict[str, str] | None = None) -> Iterator[int]:
    """`gunicorn --daemon` of the project as root with `args`; yields the master's pid, stops it at the end."""
    pidfile = project / f"gunicorn-{port}.pid"
    argv = [
        str(project / "venv/bin/gunicorn"),
        "-c", str(project / "project/gunicorn.conf.py"),
        "--chdir", str(project / "project"),
        "--bind", f"127.0.0.1:{port}",
        "--workers", "2",
        "--daemon",
        "--pid", str(pidfile),
        "--error-logfile", str(project / f"error-{port}.log"),
        "--control-socket", str(project / f"ctl-{port}.sock"),
        *args,
    ]  # fmt: skip
    started = subprocess.run(argv, env=clean_env(**(env or {})), capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr
    assert wait_until(pidfile.exists, 30), (project / f"error-{port}.log").read_text()
    master = int(pidfile.read_text())
    try:
        yield master
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(master, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and Path(f"/proc/{master}").exists():
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.kill(master, signal.SIGKILL)


def test_unprivileged_workers_of_a_root_master_count_every_request(public_project: Path):
    port = free_port()
    nobody = pwd.getpwnam("nobody")
    with daemon(public_project, port, "--user", "nobody", "--group", str(nobody.pw_gid), "--umask", "077") as master:
        assert wait_until(lambda: len(children(master)) == 2, 30)
        assert wait_until(lambda: request_status(port, "/hello") == 200, 30)
        workers = children(master)
        assert {uid_of(pid) for pid in workers} == {nobody.pw_uid} and uid_of(master) == 0

        served = {"/hello": 1, "/items/<item_id>": 0}  # the readiness probe above was one /hello
        for i in range(REQUESTS):
            path = "/hello" if i % 2 else f"/items/{i}"
            assert request_status(port, path) == 200
            served["/hello" if i % 2 else "/items/<item_id>"] += 1
            if i == REQUESTS // 2:  # a worker killed between requests: its counts are folded by the master
                os.kill(workers[0], signal.SIGKILL)
                assert wait_until(lambda: len(children(master)) == 2 and workers[0] not in children(master), 30)

        families = wait_until(lambda: compacted(port), 30)
        assert families, "the dead worker's files were never folded"
        for route, count in served.items():
            assert value(families, "http_requests_total", route=route, status="200") == count, route
        assert value(families, "example_items_viewed_total") == served["/items/<item_id>"]
        assert value(families, "metrics_write_errors_total") == 0
        assert value(families, "metrics_scrape_errors_total") == 0
        log = (public_project / f"error-{port}.log").read_text()
        assert "Permission denied" not in log and "cannot store" not in log, log[-3000:]


def request_status(port: int, path: str) -> int:
    try:
        return request("GET", port, path, timeout=5)[0]
    except OSError:
        return 0


def compacted(port: int) -> dict | None:
    """The exposition once the master has folded a dead worker."""
    families = scrape(port)
    return families if value(families, "metrics_compactions_total") >= 1 else None


def test_a_named_directory_the_workers_cannot_use_stops_the_start(tmp_path: Path):
    needs_root()
    directory = tmp_path / "metrics"
    directory.mkdir(mode=0o700)  # root's
    port = free_port()
    argv = [
        str(Path(sys.executable).with_name("gunicorn")),
        "-c", "gunicorn.conf.py",
        "--bind", f"127.0.0.1:{port}",
        "--user", "nobody",
        "--group", str(pwd.getpwnam("nobody").pw_gid),
        "--control-socket", str(tmp_path / "ctl.sock"),
    ]  # fmt: skip
    env = clean_env(PROMETHEUS_MULTIPROC_DIR=str(directory))
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert f"PROMETHEUS_MULTIPROC_DIR='{directory}'" in out, out[-2000:]
    assert "mode drwx------" in out and f"uid {pwd.getpwnam('nobody').pw_uid}" in out, out[-2000:]
