"""Shared fixtures: start a real `gunicorn -c gunicorn.conf.py` on a free loopback port, scrape it, parse it."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# In-process tests use prometheus_client's in-memory mode; it is chosen at first import.
os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
os.environ.pop("prometheus_multiproc_dir", None)

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**overrides: str) -> dict[str, str]:
    """The test process's environment without promfork's variables, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if k not in _OWN_VARS}
    env.update(overrides)
    return env


class Gunicorn:
    """A running `gunicorn -c gunicorn.conf.py` with its own multiprocess directory and log."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None, workers: int = 4) -> None:
        self.workers = workers
        self.port = free_port()
        self.tmp = tmp
        env = env or {}
        self.multiproc_dir = Path(env.get("PROMETHEUS_MULTIPROC_DIR", tmp / "multiproc"))
        self.log_path = tmp / f"gunicorn-{self.port}.log"
        self.env = clean_env(**{**env, "PROMETHEUS_MULTIPROC_DIR": str(self.multiproc_dir)})
        self.argv = [
            GUNICORN,
            "-c",
            "gunicorn.conf.py",
            "--bind",
            f"127.0.0.1:{self.port}",
            "--workers",
            str(workers),
            "--control-socket",
            str(tmp / f"ctl-{self.port}.sock"),
            *args,
        ]
        self.proc: subprocess.Popen | None = None

    def start(self, wait: float = 20.0) -> Gunicorn:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                status, _, _ = request("GET", self.port, "/healthz", timeout=1)
                if status == 200 and self._all_workers_booted():
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn did not answer within {wait}s:\n{self.log()}")

    def _all_workers_booted(self) -> bool:
        # Each worker records its slot at the end of post_fork; without metrics there is no marker.
        if self.env.get("METRICS_ENABLED", "true").lower() in ("false", "0", "no", "off"):
            return True
        return len(list(self.multiproc_dir.glob("[0-9]*.slot"))) >= self.workers

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._log.close()

    def worker_pids(self) -> list[int]:
        """The master's current children (its workers)."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in path.read_text().split()]

    def scrape(self, **kwargs) -> dict:
        return scrape(self.port, **kwargs)


@pytest.fixture
def gunicorn_factory(tmp_path: Path) -> Iterator:
    """Start real gunicorn servers; every one is stopped at the end of the test."""
    started: list[Gunicorn] = []

    def start(*args: str, env: dict[str, str] | None = None, workers: int = 4) -> Gunicorn:
        server = Gunicorn(tmp_path, *args, env=env, workers=workers).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def request(
    method: str, port: int, path: str, body: bytes | dict | None = None, headers: dict | None = None, timeout=30
) -> tuple[int, dict, bytes]:
    """One HTTP request to 127.0.0.1:port; returns (status, headers, body)."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        all_headers = {"Content-Type": "application/json"} if body is not None else {}
        all_headers.update(headers or {})
        conn.request(method, path, body=body, headers=all_headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def scrape(port: int, headers: dict | None = None) -> dict:
    """GET /metrics and parse it with prometheus_client.parser into {family name: family}."""
    status, _, body = request("GET", port, "/metrics", headers=headers)
    assert status == 200, body[:500]
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def samples(families: dict, sample_name: str) -> dict[tuple, float]:
    """Every sample called `sample_name`, keyed by its sorted label items."""
    out = {}
    for family in families.values():
        for s in family.samples:
            if s.name == sample_name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(families: dict, sample_name: str, **labels: str) -> float:
    """The sum of the samples called `sample_name` whose labels include `labels` (0 if none)."""
    total = 0.0
    for key, v in samples(families, sample_name).items():
        if all(item in key for item in labels.items()):
            total += v
    return total


def counter_samples(families: dict) -> dict[tuple, float]:
    """Every aggregated monotonic sample (counters, histograms of non-negative data).

    Per-process counters (process_cpu_seconds_total by worker slot) are left out: they
    restart with their process, which Prometheus treats as a reset by design.
    """
    out = {}
    for family in families.values():
        if family.type not in ("counter", "histogram") or family.name.startswith("process_"):
            continue
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def chat(port: int, body: dict, timeout: float = 30) -> tuple[int, dict | None, list[dict]]:
    """POST a chat completion; returns (status, JSON body or None, SSE chunks for streams)."""
    status, headers, raw = request("POST", port, "/v1/chat/completions", body, timeout=timeout)
    if headers.get("content-type", "").startswith("text/event-stream"):
        return status, None, parse_sse(raw)
    return status, json.loads(raw) if raw else None, []


def parse_sse(raw: bytes) -> list:
    """The data payloads of a Server-Sent Events body, JSON-decoded ('[DONE]' kept as a string)."""
    events = []
    for block in raw.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


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


def assert_never_decreases(snapshots: list[dict]) -> None:
    for before, after in itertools.pairwise(snapshots):
        for key, old in before.items():
            new = after.get(key)
            assert new is not None, f"{key} disappeared between scrapes"
            assert new >= old, f"{key} went backwards: {old} -> {new}"


@pytest.fixture
def mpdir(tmp_path: Path) -> Path:
    """An empty private multiprocess directory."""
    d = tmp_path / "mp"
    d.mkdir(mode=0o700)
    return d


class WheelEnv:
    """A clean virtualenv with promfork installed from a wheel built from this checkout (not editable)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.python = str(root / "venv" / "bin" / "python")
        self.gunicorn = str(root / "venv" / "bin" / "gunicorn")

    def project(self, example: str, dest: Path) -> Path:
        """Copy examples/<example> to `dest`, outside the repository, beside a `metrics.py` of the user's own."""
        import shutil

        shutil.copytree(ROOT / "examples" / example, dest)
        (dest / "metrics.py").write_text('"""The user\'s own module called metrics; promfork must not mind."""\n')
        return dest


@pytest.fixture(scope="session")
def wheel_env(tmp_path_factory) -> WheelEnv:
    """Build the wheel, make a venv outside the repository, install the wheel and the examples' needs."""
    root = tmp_path_factory.mktemp("wheel-env")
    env = WheelEnv(root)
    run = dict(capture_output=True, text=True, timeout=600)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(root), str(ROOT)], **run)
    assert built.returncode == 0, built.stderr
    (wheel,) = root.glob("promfork-*.whl")
    made = subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], **run)
    assert made.returncode == 0, made.stderr
    needs = ["fastapi>=0.110", "uvicorn>=0.29", "uvicorn-worker>=0.2", "gevent>=24.2"]
    installed = subprocess.run([env.python, "-m", "pip", "install", "-q", str(wheel), *needs], **run)
    assert installed.returncode == 0, installed.stderr
    return env


class ExampleServer(Gunicorn):
    """A user's project (a copied example) served by `gunicorn -c gunicorn.conf.py` from its own directory.

    ``ExampleServer(project, tmp, *gunicorn_args, gunicorn=wheel_env.gunicorn, workers=2, env={...})``;
    use it as a context manager (``with server:`` starts it and always stops it: SIGTERM, then SIGKILL after
    15 s). It listens on a free loopback port (``.port``), writes metrics under ``tmp/multiproc``
    (``.multiproc_dir``) and its output to ``.log_path`` (``.log()``); ``.scrape()``, ``.worker_pids()`` and
    ``.proc`` as for ``Gunicorn``. Ready once /metrics answers (it is never counted in the HTTP metrics,
    so readiness probes do not disturb exact totals) and every worker has booted. PYTHONPATH is dropped:
    the project sees only what its own interpreter has installed.
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
        self.env.pop("PYTHONPATH", None)

    def start(self, wait: float = 60.0) -> ExampleServer:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            self.argv, cwd=self.project, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        token = self.env.get("METRICS_AUTH_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                request("GET", self.port, "/metrics", headers=headers, timeout=2)  # any answer: 404 when disabled
                if self._all_workers_booted():
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gunicorn did not answer within {wait}s:\n{self.log()}")

    def __enter__(self) -> ExampleServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
