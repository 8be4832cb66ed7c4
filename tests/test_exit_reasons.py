"""How the hooks classify a worker's exit (the real exits are caused in test_master_metrics.py;
an error exit through the worker's own exit path cannot be provoked from outside, so it is
checked here at the hook level, with a real exception in flight)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from promfork.config import Settings
from promfork.master import hooks


@pytest.fixture
def master(tmp_path: Path, monkeypatch):
    registry = CollectorRegistry()
    state = hooks._MasterState(Settings(), directory=str(tmp_path))
    state.lifecycle = hooks._Lifecycle(state.settings, registry)
    monkeypatch.setattr(hooks, "_master", state)
    return registry


def exits(registry, reason: str) -> float:
    return registry.get_sample_value("gunicorn_worker_exits_total", {"reason": reason})


def worker(pid: int, nr: int = 0, max_requests: int = 1000, aborted: bool = False):
    return SimpleNamespace(pid=pid, nr=nr, max_requests=max_requests, aborted=aborted)


def leave(w, exc: BaseException | None) -> None:
    """Run worker_exit the way Gunicorn does: from a finally, with `exc` propagating."""
    try:
        if exc is not None:
            raise exc
    except BaseException:
        hooks.worker_exit(None, w)
    else:
        hooks.worker_exit(None, w)


@pytest.mark.parametrize(
    ("exc", "w", "reason"),
    [
        (SystemExit(0), worker(11), "normal"),
        (SystemExit(0), worker(12, nr=1000), "max_requests"),
        (SystemExit(-1), worker(13), "error"),
        (RuntimeError("boom"), worker(14), "error"),
    ],
)
def test_the_worker_note_names_the_reason_and_the_master_counts_it(master, monkeypatch, exc, w, reason):
    monkeypatch.setattr("os.getpid", lambda: w.pid)
    leave(w, exc)
    hooks.child_exit(SimpleNamespace(WORKERS={}), w)
    assert exits(master, reason) == 1
    assert sum(exits(master, r) for r in hooks.EXIT_REASONS) == 1


def test_abort_and_silent_deaths(master, monkeypatch):
    aborted = worker(21)
    monkeypatch.setattr("os.getpid", lambda: 21)
    hooks.worker_abort(aborted)
    leave(aborted, SystemExit(1))
    hooks.child_exit(SimpleNamespace(WORKERS={}), aborted)
    hooks.child_exit(SimpleNamespace(WORKERS={}), worker(22))  # no note: killed outright
    hooks.child_exit(SimpleNamespace(WORKERS={}), worker(23, aborted=True))  # master gave up and SIGKILLed
    assert exits(master, "timeout") == 2
    assert exits(master, "signal") == 1
