"""Fixtures only: real Gunicorn servers stopped after each test, a private multiprocess directory, a wheel's venv.

The helpers the tests share live in tests/support/.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# In-process tests use prometheus_client's in-memory mode; it is chosen at first import
# (tests.support.client imports it), so these go before anything else is imported.
os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
os.environ.pop("prometheus_multiproc_dir", None)

# Failed asserts inside the helpers explain themselves as the tests' own do.
pytest.register_assert_rewrite("tests.support")

from tests.support.servers import Gunicorn  # noqa: E402
from tests.support.wheel import WheelEnv  # noqa: E402


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


@pytest.fixture
def mpdir(tmp_path: Path) -> Path:
    """An empty private multiprocess directory."""
    d = tmp_path / "mp"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture(scope="session")
def wheel_env(tmp_path_factory) -> WheelEnv:
    """Build the wheel, make a venv outside the repository, install the wheel and the examples' needs."""
    return WheelEnv.build(tmp_path_factory.mktemp("wheel-env"))
