"""Gunicorn as a child process: start it, wait until it is ready, stop it.

promfork-load's server (promfork.loadtest.server) runs gunicorn through
GunicornProcess; so do the repository's tests and benchmarks, so that gunicorn
is started, awaited and stopped one way everywhere:

* ``argv`` (gunicorn first, or a wrapper that execs it, such as taskset) runs
  with the environment ``env`` in the directory ``cwd``; its stdout and stderr
  are appended to the file ``log_path``;
* it is ready once a GET of ``ready_url`` gets an HTTP answer below 500 and
  ``ready()``, if given, returns true (e.g. every worker has booted,
  ``booted_workers``). A gunicorn that exits first, or is not ready in time,
  is stopped and GunicornError names its log, which is kept;
* ``stop()`` sends SIGTERM (gunicorn's graceful shutdown), then SIGKILL if it
  is still running after the timeout.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Self
from urllib.parse import urlsplit

from promfork.directory import filenames

GUNICORN = os.path.join(os.path.dirname(sys.executable), "gunicorn")  # the one installed beside this interpreter


class GunicornError(RuntimeError):
    """gunicorn exited while starting, or was not ready in time; the message ends with its log's path."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def booted_workers(directory: str | os.PathLike) -> int:
    """How many worker slots have a slot file in the metrics `directory`.

    Each worker records its slot at the end of post_fork (promfork.master.slots);
    slots stay put as workers are replaced, so after a start this is how many
    workers have booted. 0 while the directory does not exist yet.
    """
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    return sum(1 for name in names if filenames.slot_of(name) not in (None, filenames.MASTER_SLOT))


def answers(url: str, headers: Mapping[str, str] | None = None, timeout: float = 2.0) -> bool:
    """Whether a GET of `url` gets an HTTP answer with a status below 500 (refused, cut or timed out: False)."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", target, headers=dict(headers or {}))
        response = conn.getresponse()
        response.read()
        return response.status < 500
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


class GunicornProcess:
    """One gunicorn run as a child process (see the module docstring).

    ``argv``, ``env``, ``cwd``, ``ready_url``, ``ready`` and ``headers`` (sent
    with the readiness GET) are read when it starts, so a caller may still
    change them after construction. ``env`` None means this process's
    environment. ``proc`` is the subprocess.Popen once started.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        ready_url: str,
        log_path: str | os.PathLike,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        ready: Callable[[], bool] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.log_path = log_path
        self.ready_url = ready_url
        self.ready = ready
        self.headers = dict(headers or {})
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> Self:
        """launch(), then wait_ready(timeout); GunicornError if it is not ready."""
        self.launch()
        self.wait_ready(timeout)
        return self

    def launch(self) -> None:
        """Start gunicorn and return at once (wait_ready() waits for it)."""
        with open(self.log_path, "ab") as log:  # the child has its own copy of the descriptor
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Return once ready; if gunicorn exits first or `timeout` seconds pass, stop it and raise GunicornError."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise GunicornError(f"gunicorn exited at start ({self.proc.returncode}); see {self.log_path}")
            if answers(self.ready_url, self.headers) and (self.ready is None or self.ready()):
                return
            time.sleep(0.1)
        self.stop()
        raise GunicornError(f"gunicorn was not ready within {timeout:g}s; see {self.log_path}")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL if still running after `timeout` seconds; its exit status (0 if never started)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def worker_pids(self) -> list[int]:
        """The master's current children (its workers), from /proc."""
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as children:
            return [int(pid) for pid in children.read().split()]

    def log(self) -> str:
        """What gunicorn has written so far."""
        with open(self.log_path, "rb") as log:
            return log.read().decode(errors="replace")
