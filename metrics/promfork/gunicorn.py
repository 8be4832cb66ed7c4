"""The Gunicorn server hooks, for a gunicorn.conf.py to assign; their bodies live in promfork.master.hooks.

    from promfork import gunicorn as hooks
    hooks.prepare_environment()         # first: before anything imports prometheus_client
    on_starting = hooks.on_starting
    ...

Importing this module does not import prometheus_client (a test checks it): the
config file is read before PROMETHEUS_MULTIPROC_DIR is set.
"""

from promfork.master.hooks import (
    EXIT_REASONS,
    child_exit,
    dirty_worker_exit,
    nworkers_changed,
    on_dirty_starting,
    on_exit,
    on_reload,
    on_starting,
    post_fork,
    pre_fork,
    prepare_environment,
    when_ready,
    worker_abort,
    worker_exit,
)

__all__ = [
    "EXIT_REASONS",
    "child_exit",
    "dirty_worker_exit",
    "nworkers_changed",
    "on_dirty_starting",
    "on_exit",
    "on_reload",
    "on_starting",
    "post_fork",
    "pre_fork",
    "prepare_environment",
    "when_ready",
    "worker_abort",
    "worker_exit",
]
