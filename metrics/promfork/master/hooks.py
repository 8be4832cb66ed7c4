"""Gunicorn server hooks that keep multiprocess metrics exact; gunicorn.conf.py only assigns them.

Only Gunicorn's documented settings and hooks are used. The master's state (its
lease on the directory, the compactor thread, the metrics listener) lives in
this module because Gunicorn re-executes the config file on HUP while
``on_starting`` runs only once per master: state kept in the config file would
be lost on the first reload.

Lifecycle metrics are written by the master from hooks, which run on its main
thread. Why a worker exited is only known inside the worker, so ``worker_exit``
leaves a one-word ``<pid>.exit`` note that ``child_exit`` reads; a worker killed
outright (SIGKILL, OOM) leaves none.

Gunicorn 27's dirty worker pools (``dirty_workers``/``dirty_apps``) live in
another branch of the process tree: the master forks a dirty arbiter, which
forks the dirty workers. They run promfork's at-fork handlers and write their
own files like any worker, but they are not in the master's ``WORKERS`` and
their deaths never reach ``child_exit``: the dirty arbiter reports them to
``dirty_worker_exit``, in its own process. So ``on_dirty_starting`` gives the
dirty arbiter a compactor of its own (the files lock serializes it with the
master's), and ``dirty_worker_exit`` queues a dead dirty worker's files there.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
from dataclasses import dataclass

from promfork.config import ConfigError, Settings, load_settings
from promfork.directory import filenames, ownership
from promfork.directory.locks import MasterLease
from promfork.directory.setup import MultiprocDirError, created_here, ensure_directory, is_private, wipe_stale_files

EXIT_REASONS = ("normal", "max_requests", "timeout", "signal", "error")


@dataclass
class _MasterState:
    settings: Settings
    directory: str | None = None
    lease: MasterLease | None = None
    compactor: object | None = None  # promfork.master.compaction.Compactor (imported once the env is set)
    dirty_compactor: object | None = None  # the dirty arbiter's own Compactor, set in that process only
    library: object | None = None  # promfork.reader.collector.LibraryMetrics
    lifecycle: object | None = None  # _Lifecycle
    server: object | None = None  # promfork.reader.listener.MetricsServer
    fast_values: bool = False  # promfork.writer.values.MmapValue stores the values (else prometheus-client's class)
    stale_removed: int | None = None  # files of earlier runs wiped at a cold start; None when shared
    wiring_checked: bool = False  # the config's hooks were checked (_check_wiring)


_master: _MasterState | None = None


def prepare_environment() -> Settings:
    """Validate the metrics settings and export PROMETHEUS_MULTIPROC_DIR; exit with a clear message if invalid.

    Call it at the top of gunicorn.conf.py: the variable must be set before
    anything imports prometheus_client, in the master and (by inheritance) in
    every worker. It also takes the master's lease on the directory and, on a
    cold start, wipes files of earlier runs: here, before Gunicorn loads the app
    (``--preload`` creates the master's metric files before ``on_starting``).
    Then it installs promfork's faster value store (promfork.writer.values) while
    prometheus_client is not yet imported. Safe to call again on HUP: the
    directory and the lease are kept, and nothing is checked again (a full
    disk must not stop a reloading master).
    """
    global _master
    fast_values = False
    try:
        settings = load_settings()
        if settings.enabled:
            if _master is not None and _master.lease is not None:
                directory = _master.directory
            else:
                directory = ensure_directory(settings.multiproc_dir)
                if settings.multiproc_dir is None:
                    # Removed by on_exit normally; this covers a start that fails before that.
                    atexit.register(_remove_if_unused, directory, os.getpid())
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
            settings = load_settings()
    except (ConfigError, MultiprocDirError) as exc:
        sys.exit(f"promfork: configuration error: {exc}")
    if _master is None:
        _master = _MasterState(settings)
    else:
        _master.settings = settings
    if settings.enabled:
        if _master.lease is None:
            _master.directory = directory
            _master.lease = MasterLease(directory)
            cold = _master.lease.acquire()
            # A config that imported prometheus_client first may already have metrics (and files) of its own.
            own = os.getpid() if "prometheus_client" in sys.modules else None
            _master.stale_removed = wipe_stale_files(directory, keep_pid=own) if cold else None
            _master.lease.keep()
        from promfork.writer import values  # imports prometheus_client: only now that the variable is set

        fast_values = values.install()
    _master.fast_values = fast_values
    return settings


def _remove_if_unused(directory: str, creator: int) -> None:
    """At exit of the process that created a private directory: delete it unless a master uses it."""
    if os.getpid() != creator or not os.path.isdir(directory) or not is_private(directory):
        return  # a forked worker inherits atexit handlers: never act there
    if _master is not None and _master.lease is not None:
        _master.lease.release_if_last()  # our own hold would make us look like a second master
        _master.lease = None
    lease = MasterLease(directory)
    if lease.acquire():
        shutil.rmtree(directory, ignore_errors=True)
    lease.release_if_last()


def _state() -> _MasterState:
    if _master is None:
        raise RuntimeError("call promfork.gunicorn.prepare_environment() at the top of gunicorn.conf.py")
    return _master


class _Lifecycle:
    """What Gunicorn itself is doing, written by the master."""

    def __init__(self, settings: Settings, registry=None) -> None:
        from prometheus_client import Counter, Gauge

        name = settings.metric_name
        self.workers = Gauge(
            name("gunicorn_workers"), "Worker processes alive.", multiprocess_mode="livesum", registry=registry
        )
        self.configured = Gauge(
            name("gunicorn_workers_configured"),
            "Workers the master is configured to run.",
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.boots = Counter(name("gunicorn_worker_boots_total"), "Worker processes started.", registry=registry)
        self.exits = Counter(
            name("gunicorn_worker_exits_total"),
            "Worker exits by reason: normal, max_requests (recycled), timeout (aborted by the master), "
            "signal (killed, e.g. SIGKILL or OOM), error.",
            ["reason"],
            registry=registry,
        )
        self.reloads = Counter(
            name("gunicorn_master_reloads_total"), "Configuration reloads (HUP) of the master.", registry=registry
        )
        for reason in EXIT_REASONS:
            self.exits.labels(reason)


def on_starting(server) -> None:
    """Master start: report the directory and the value store, create the lifecycle metrics."""
    state = _state()
    _check_wiring(server)
    if not state.settings.enabled or state.lease is None:
        return
    from promfork.client import ensure_multiprocess_mode
    from promfork.master.slots import MASTER, record_slot
    from promfork.reader.collector import library_metrics

    ensure_multiprocess_mode()
    _hand_directory_to_workers(server, state.directory)
    if state.stale_removed is not None:
        server.log.info(
            "promfork: metrics directory %s (cold start, %d stale files removed)", state.directory, state.stale_removed
        )
    else:
        server.log.info("promfork: metrics directory %s shared with a live master; keeping its files", state.directory)
    if state.fast_values:
        server.log.info("promfork: metric values stored by promfork.writer.values.MmapValue")
    else:
        server.log.warning(
            "promfork: prometheus_client created metrics before prepare_environment(); its own, slower value "
            "store stays in use (totals are still exact, but dead workers' files are not compacted)"
        )
    state.library = library_metrics(state.settings)
    state.lifecycle = _Lifecycle(state.settings)
    try:
        record_slot(state.directory, MASTER, os.getpid())
    except OSError as exc:
        server.log.error("promfork: cannot record the master's slot (process_* metrics): %s", exc)


def _hand_directory_to_workers(server, directory: str) -> None:
    """With --user/--group (a root master, unprivileged workers): the workers can use every file; else exit."""
    uid, gid = server.cfg.uid, server.cfg.gid
    try:
        if is_private(directory) or created_here(directory):
            ownership.hand_to(directory, uid, gid, including_directory=True)
        else:
            ownership.check_usable_by(directory, uid, gid, f"PROMETHEUS_MULTIPROC_DIR={directory!r}")
            ownership.hand_to(directory, uid, gid, including_directory=False)
    except OSError as exc:
        sys.exit(f"promfork: configuration error: {exc}")


def when_ready(server) -> None:
    """Master ready: start the compactor thread and, with METRICS_PORT, the master's metrics listener."""
    state = _state()
    _check_wiring(server)
    if state.directory is None:
        return

    def protected() -> set[int]:
        return {server.pid, *server.WORKERS.copy()}

    state.compactor = _start_compactor(state, protected)
    state.lifecycle.configured.set(server.num_workers)
    if state.settings.metrics_port is not None and state.server is None:
        from promfork.reader.collector import exposition_registry
        from promfork.reader.exposition import make_metrics_app
        from promfork.reader.listener import MetricsServer

        app = make_metrics_app(exposition_registry(state.settings), state.settings.auth_token)
        try:
            state.server = MetricsServer(app, state.settings.metrics_bind, state.settings.metrics_port)
        except OSError as exc:
            where = f"{state.settings.metrics_bind}:{state.settings.metrics_port}"
            sys.exit(f"promfork: cannot listen on METRICS_PORT ({where}): {exc.strerror}")
        state.server.start()
        server.log.info("promfork: master serving /metrics on http://%s:%d/metrics", *state.server.server_address[:2])


def _start_compactor(state: _MasterState, protected):
    """A running Compactor for this process, counting into the library metrics; None with the stock value class."""
    if not state.fast_values:
        # compaction relies on the writer lock promfork's value store takes (see promfork.master.compaction)
        return None
    from promfork.master.compaction import Compactor

    def counted(result) -> None:
        state.library.count_compactions(len(result.pids))
        if result.quarantined:
            state.library.count_scrape_errors(len(result.quarantined))

    compactor = Compactor(
        state.directory,
        protected,
        on_compacted=counted,
        on_write_error=lambda exc: state.library.count_write_errors(1),
    )
    compactor.start()
    return compactor


def pre_fork(server, worker) -> None:
    """Master, before a fork: give the new worker the lowest free slot and count the boot."""
    state = _state()
    if state.directory is None:
        return
    from promfork.master.slots import free_slot

    worker.promfork_slot = free_slot(getattr(w, "promfork_slot", -1) for w in server.WORKERS.copy().values())
    state.lifecycle.boots.inc()
    state.lifecycle.workers.set(len(server.WORKERS) + 1)


def post_fork(server, worker) -> None:
    """Worker start: close the master's listener, record the slot, check prometheus_client's mode."""
    state = _state()
    if state.directory is None:
        return
    if state.server is not None:
        state.server.close_in_child()
    from promfork.client import ensure_multiprocess_mode
    from promfork.master.slots import record_slot

    ensure_multiprocess_mode()
    slot = getattr(worker, "promfork_slot", None)  # None when pre_fork is not assigned
    if slot is not None:
        try:
            record_slot(state.directory, str(slot), os.getpid())
        except OSError as exc:
            server.log.error("promfork: cannot record worker slot %s (process_* metrics): %s", slot, exc)


def worker_abort(worker) -> None:
    """Worker received SIGABRT (the master's timeout): remember it for worker_exit."""
    worker.promfork_aborted = True


def worker_exit(server, worker) -> None:
    """Worker, on its way out: leave a note saying why, for the master's exit counter."""
    state = _state()
    if state.directory is None:
        return
    exc = sys.exc_info()[1]
    code = exc.code if isinstance(exc, SystemExit) else (None if exc is None else -1)
    if getattr(worker, "promfork_aborted", False):
        reason = "timeout"
    elif code in (0, None):
        reason = "max_requests" if worker.nr >= worker.max_requests else "normal"
    else:
        reason = "error"
    path = os.path.join(state.directory, filenames.exit_note_name(os.getpid()))
    with contextlib.suppress(OSError):
        fd = ownership.create(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, reason.encode())
        finally:
            os.close(fd)


def child_exit(server, worker) -> None:
    """A worker was reaped: count why it exited, drop its live gauges, queue its files for compaction.

    Cheap by design (a few small file operations and a queue put): in older
    Gunicorn releases this runs inside the SIGCHLD handler, and the master must
    never block here.
    """
    state = _state()
    if state.directory is None:
        return
    from promfork.master.compaction import remove_live_gauges

    note = os.path.join(state.directory, filenames.exit_note_name(worker.pid))
    try:
        with open(note) as src:
            reason = src.read().strip()
        os.unlink(note)
    except OSError:
        reason = "timeout" if worker.aborted else "signal"
    state.lifecycle.exits.labels(reason if reason in EXIT_REASONS else "error").inc()
    state.lifecycle.workers.set(len(server.WORKERS))
    try:
        remove_live_gauges(state.directory, worker.pid)
    except OSError as exc:
        server.log.error("promfork: cannot remove live gauges of worker %d: %s", worker.pid, exc)
    if state.compactor is not None:
        state.compactor.worker_died(worker.pid)


def on_dirty_starting(arbiter) -> None:
    """Dirty arbiter start (forked from the master): drop the inherited listener, start its own compactor."""
    state = _state()
    if state.directory is None:
        return
    if state.server is not None:  # a dirty arbiter respawned after when_ready inherits the METRICS_PORT listener
        state.server.close_in_child()
        state.server = None
    state.compactor = None  # the master's, copied by fork: its thread does not run here

    def protected() -> set[int]:
        return {os.getpid(), *arbiter.workers.copy()}

    state.dirty_compactor = _start_compactor(state, protected)
    if state.dirty_compactor is not None:
        atexit.register(_stop_at_exit, state.dirty_compactor, os.getpid())


def _stop_at_exit(compactor, owner: int) -> None:
    """At the dirty arbiter's exit, fold what is pending; dirty workers inherit atexit handlers: never act there."""
    if os.getpid() == owner:
        compactor.stop()


def dirty_worker_exit(arbiter, worker) -> None:
    """Dirty arbiter, a dirty worker was reaped: drop its live gauges, queue its files for compaction."""
    state = _state()
    if state.directory is None:
        return
    from promfork.master.compaction import remove_live_gauges

    try:
        remove_live_gauges(state.directory, worker.pid)
    except OSError as exc:
        arbiter.log.error("promfork: cannot remove live gauges of dirty worker %d: %s", worker.pid, exc)
    if state.dirty_compactor is not None:
        state.dirty_compactor.worker_died(worker.pid)


def nworkers_changed(server, new_value, old_value) -> None:
    """TTIN/TTOU or a reload changed the worker count."""
    state = _state()
    if state.lifecycle is not None:
        state.lifecycle.configured.set(new_value)


def on_reload(server) -> None:
    """HUP: count the reload (the listener and compactor carry on unchanged)."""
    state = _state()
    if state.lifecycle is not None:
        state.lifecycle.reloads.inc()


def on_exit(server) -> None:
    """Master exit: stop compacting and listening, release the lease, remove a private directory nobody uses."""
    state = _state()
    if state.directory is None:
        return
    if state.server is not None:
        state.server.stop()
    if state.compactor is not None:
        state.compactor.stop()
    if state.lease is not None and state.lease.release_if_last() and is_private(state.directory):
        shutil.rmtree(state.directory, ignore_errors=True)


# Every hook promfork has, and what a config that does not run it loses (see _check_wiring).
_LOSSES = {
    "on_starting": "lifecycle metrics and the master's process metrics",
    "when_ready": "compaction of dead workers' files (they pile up) and the METRICS_PORT listener",
    "pre_fork": "worker slots (per-slot process_* metrics) and gunicorn_worker_boots_total",
    "post_fork": "the import-order check and closing the METRICS_PORT listener in workers",
    "worker_abort": "exits by timeout (counted as 'signal')",
    "worker_exit": "exit reasons normal and max_requests (counted as 'signal')",
    "child_exit": "exit counts, dead workers' live gauges and their compaction",
    "nworkers_changed": "gunicorn_workers_configured after TTIN/TTOU",
    "on_reload": "gunicorn_master_reloads_total",
    "on_exit": "a clean stop of the compactor and listener, and removing the private directory",
    "on_dirty_starting": "compaction of dead dirty workers' files",
    "dirty_worker_exit": "compaction of dead dirty workers' files",
}
HOOKS = {name: globals()[name] for name in _LOSSES}
for _name, _hook in HOOKS.items():
    _hook.promfork_hook = _name  # a chained hook (promfork.gunicorn.install) carries the same mark


def missing_hooks(cfg) -> list[str]:
    """A line per promfork hook that this Gunicorn has and `cfg` does not run, saying what is lost."""
    lines = []
    for name, lost in _LOSSES.items():
        setting = cfg.settings.get(name)
        if setting is not None and getattr(setting.get(), "promfork_hook", None) != name:
            lines.append(f"promfork: gunicorn.conf.py does not run promfork's {name} hook: no {lost}")
    return lines


def _check_wiring(server) -> None:
    """Once per master: warn about every promfork hook the config left out."""
    state = _state()
    if state.wiring_checked:
        return
    state.wiring_checked = True
    for line in missing_hooks(server.cfg):
        server.log.warning(line)
