"""Servers the tests start, and the plumbing around child processes.

``Gunicorn`` is the gateway of this checkout under ``gunicorn -c gunicorn.conf.py``;
``ExampleServer`` a user's project (a copied example) under its own Gunicorn. Both are
promfork.loadtest.gunicorn_process.GunicornProcess, the one way Gunicorn is started by the
tests, the benchmarks and promfork-load. Besides: free loopback ports, an environment
without promfork's variables, a start that must fail, stopping any child process, and waiting
for a condition.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Self

from promfork.loadtest.gunicorn_process import GUNICORN, GunicornError, GunicornProcess, booted_workers, free_port
from tests.support.client import scrape

ROOT = Path(__file__).resolve().parents[2]
# Variables of ours that a developer's shell may have set; tests decide them explicitly.
_OWN_VARS = (
    "PROMETHEUS_MULTIPROC_DIR",
    "prometheus_multiproc_dir",
    "METRICS_ENABLED",
    "METRICS_PORT",
    "METRICS_AUTH_TOKEN",
    "METRICS_NAMESPACE",
    "METRICS_CONST_LABELS",
    "METRICS_LATENCY_BUCKETS",
    "LLM_PROVIDER",
    "MOCK_LATENCY_MS",
    "WEB_CONCURRENCY",
    "GUNICORN_CMD_ARGS",
)


def clean_env(**overrides: str) -> dict[str, str]:
    """The test process's environment without promfork's variables, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if k not in _OWN_VARS}
    env.update(overrides)
    return env


class Gunicorn(GunicornProcess):
    """A `gunicorn -c gunicorn.conf.py` of this checkout with its own multiprocess directory and log.

    ``Gunicorn(tmp, *gunicorn_args, env={...}, workers=4).start()``: it listens on a free
    loopback port (``.port``), writes metrics under ``tmp/multiproc`` unless ``env`` names
    PROMETHEUS_MULTIPROC_DIR (``.multiproc_dir``), and its output to ``.log_path`` (``.log()``).
    ``.argv`` and ``.env`` may be changed before ``start()``; ready once /healthz answers and
    every worker has booted. ``.stop()``, ``.worker_pids()`` and ``.proc`` as for GunicornProcess.
    """

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None, workers: int = 4) -> None:
        self.workers = workers
        self.port = free_port()
        self.tmp = tmp
        env = env or {}
        self.multiproc_dir = Path(env.get("PROMETHEUS_MULTIPROC_DIR", tmp / "multiproc"))
        argv = [GUNICORN, "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{self.port}", "--workers", str(workers),
                "--control-socket", str(tmp / f"ctl-{self.port}.sock"), *args]  # fmt: skip
        super().__init__(
            argv,
            env=clean_env(**{**env, "PROMETHEUS_MULTIPROC_DIR": str(self.multiproc_dir)}),
            cwd=ROOT,
            log_path=tmp / f"gunicorn-{self.port}.log",
            ready_url=f"http://127.0.0.1:{self.port}/healthz",
            ready=self._all_workers_booted,
        )

    def start(self, timeout: float = 20.0) -> Self:
        """Start and wait until ready; GunicornError with the whole log if it is not (it is stopped then)."""
        try:
            return super().start(timeout)
        except GunicornError as exc:
            raise GunicornError(f"{exc}:\n{self.log()}") from None

    def _all_workers_booted(self) -> bool:
        # Each worker records its slot at the end of post_fork; without metrics there is no marker.
        if self.env.get("METRICS_ENABLED", "true").lower() in ("false", "0", "no", "off"):
            return True
        return booted_workers(self.multiproc_dir) >= self.workers

    def scrape(self, **kwargs) -> dict:
        return scrape(self.port, **kwargs)


class ExampleServer(Gunicorn):
    """A user's project (a copied example) served by `gunicorn -c gunicorn.conf.py` from its own directory.

    ``ExampleServer(project, tmp, *gunicorn_args, gunicorn=wheel_env.gunicorn, workers=2, env={...})``;
    use it as a context manager (``with server:`` starts it and always stops it: SIGTERM, then SIGKILL after
    15 s). It listens on a free loopback port (``.port``), writes metrics under ``tmp/multiproc``
    (``.multiproc_dir``) and its output to ``.log_path`` (``.log()``); ``.scrape()``, ``.worker_pids()`` and
    ``.proc`` as for ``Gunicorn``. Ready once /metrics answers (it is never counted in the HTTP metrics,
    so readiness probes do not disturb exact totals; any answer below 500 will do, a 404 when metrics are
    off) and every worker has booted. PYTHONPATH is dropped: the project sees only what its own
    interpreter has installed.
    """

    def __init__(
        self,
        project: Path,
        tmp: Path,
        *args: str,
        gunicorn: str = GUNICORN,
        env: dict[str, str] | None = None,
        workers: int = 2,
    ) -> None:
        super().__init__(tmp, *args, env=env, workers=workers)
        self.project = project
        self.argv[0] = gunicorn
        self.cwd = project
        self.env.pop("PYTHONPATH", None)
        self.ready_url = f"http://127.0.0.1:{self.port}/metrics"
        token = self.env.get("METRICS_AUTH_TOKEN")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def start(self, timeout: float = 60.0) -> Self:
        return super().start(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def gunicorn_fails_to_start(env: dict[str, str], conf: str = "gunicorn.conf.py") -> str:
    """Run this checkout's gunicorn with `conf` and `env` (over clean_env), expecting it to exit at start.

    Returns what it printed (stdout and stderr); fails the test if it exited with status 0.
    """
    argv = [GUNICORN, "-c", conf, "--bind", f"127.0.0.1:{free_port()}", "--workers", "2", "--no-control-socket"]
    proc = subprocess.run(argv, cwd=ROOT, env=clean_env(**env), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0, "gunicorn started despite the bad setting"
    return proc.stdout + proc.stderr


def terminate(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM `proc` and wait for it; SIGKILL it if it outlives `timeout`. Returns its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.1):
    """Poll `predicate` until it returns a truthy value; return its last value."""
    deadline = time.monotonic() + timeout
    result = predicate()
    while not result and time.monotonic() < deadline:
        time.sleep(interval)
        result = predicate()
    return result
