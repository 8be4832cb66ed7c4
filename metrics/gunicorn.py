"""Gunicorn server hooks that keep multiprocess metrics exact; gunicorn.conf.py only assigns them.

Only Gunicorn's documented settings and hooks are used. The master's state (its
lease on the directory and the compactor thread) lives in this module because
Gunicorn re-executes the config file on HUP while ``on_starting`` runs only once
per master: state kept in the config file would be lost on the first reload.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass

from metrics.config import ConfigError, Settings, load_settings
from metrics.multiproc import MasterLease, MultiprocDirError, ensure_directory, is_private, wipe_stale_files

log = logging.getLogger("promfork.gunicorn")


@dataclass
class _MasterState:
    settings: Settings
    directory: str | None = None
    lease: MasterLease | None = None
    compactor: object | None = None  # metrics.compaction.Compactor, imported after the env is set
    library: object | None = None  # metrics.collector.LibraryMetrics


_master: _MasterState | None = None


def prepare_environment() -> Settings:
    """Validate the metrics settings and export PROMETHEUS_MULTIPROC_DIR; exit with a clear message if invalid.

    Call it at the top of gunicorn.conf.py: the variable must be set before
    anything imports prometheus_client, in the master and (by inheritance) in
    every worker. Safe to call again on HUP: the exported directory is reused.
    """
    try:
        settings = load_settings()
        if settings.enabled:
            directory = ensure_directory(settings.multiproc_dir)
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
            settings = load_settings()
    except (ConfigError, MultiprocDirError) as exc:
        sys.exit(f"promfork: configuration error: {exc}")
    global _master
    if _master is None:
        _master = _MasterState(settings)
    else:
        _master.settings = settings
    return settings


def _state() -> _MasterState:
    if _master is None:
        raise RuntimeError("call metrics.gunicorn.prepare_environment() at the top of gunicorn.conf.py")
    return _master


def on_starting(server) -> None:
    """Master start: take the directory lease and, on a cold start, wipe files of earlier runs."""
    state = _state()
    if not state.settings.enabled:
        return
    from metrics.collector import LibraryMetrics
    from metrics.multiproc import ensure_multiprocess_mode

    ensure_multiprocess_mode()
    state.directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    state.lease = MasterLease(state.directory)
    if state.lease.acquire():
        removed = wipe_stale_files(state.directory)
        server.log.info("promfork: metrics directory %s (cold start, %d stale files removed)", state.directory, removed)
    else:
        server.log.info("promfork: metrics directory %s shared with a live master; keeping its files", state.directory)
    state.lease.keep()
    state.library = LibraryMetrics(state.settings)


def when_ready(server) -> None:
    """Master ready: start the compactor thread that folds dead workers' files."""
    state = _state()
    if state.directory is None:
        return
    from metrics.compaction import Compactor

    def protected() -> set[int]:
        return {server.pid, *server.WORKERS.copy()}

    def counted(result) -> None:
        state.library.compactions.inc(len(result.pids))
        if result.quarantined:
            state.library.scrape_errors.inc(len(result.quarantined))

    state.compactor = Compactor(state.directory, protected, on_compacted=counted)
    state.compactor.start()


def post_fork(server, worker) -> None:
    """Worker start: refuse to run if prometheus_client is not writing to the shared directory."""
    if _state().directory is None:
        return
    from metrics.multiproc import ensure_multiprocess_mode

    ensure_multiprocess_mode()


def child_exit(server, worker) -> None:
    """A worker was reaped: drop its live gauges now and queue its files for compaction.

    Cheap by design (two unlinks and a queue put): in older Gunicorn releases
    this runs inside the SIGCHLD handler, and the master must never block here.
    """
    state = _state()
    if state.directory is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, state.directory)
    if state.compactor is not None:
        state.compactor.worker_died(worker.pid)


def on_exit(server) -> None:
    """Master exit: stop compacting, release the lease, remove a private directory nobody uses."""
    state = _state()
    if state.directory is None:
        return
    if state.compactor is not None:
        state.compactor.stop()
    if state.lease is not None and state.lease.release_if_last() and is_private(state.directory):
        shutil.rmtree(state.directory, ignore_errors=True)
