"""The one place that registers at-fork handlers, and the order they run in.

Gunicorn forks every worker from the master, so each piece of per-process state
must be replaced in the child before the child records anything. Each owner
hands its child handler here (``after_fork_in_child``) under one of the steps
below; this module registers a single set of ``os.register_at_fork`` handlers
that runs them in this order, whatever order the modules were imported in:

1. ``LOCK_DESCRIPTORS`` (promfork.directory.locks): close the copies of
   transient lock descriptors the parent held, so the child never keeps a
   directory lock alive.
2. ``VALUE_STORE`` (promfork.writer.values): the child's own value files and
   lock; the parent's mappings (and their writer locks) are closed.
3. ``EXEMPLAR_STORE`` (promfork.writer.exemplars): the same for exemplars.
4. ``SCRAPE_READER`` (promfork.reader.collector): a fresh lock for the
   long-lived reader (the parent's may be held by one of its threads).
5. ``OTEL_OBSERVERS`` (promfork.otel.provider): the thread that runs
   OpenTelemetry observable callbacks, started again for the child.

Around the fork itself, ``fork_guard`` is taken: prometheus-client (and
promfork's value store) guard a process's files with a plain lock, and a
background thread of the master inside a metric update at the instant of the
fork would hand the worker that lock held. Master threads update metrics under
``fork_guard``; ``fork()`` waits for it.

Importing this module imports nothing else of promfork's and no third-party code.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

LOCK_DESCRIPTORS = "lock descriptors"
VALUE_STORE = "value store"
EXEMPLAR_STORE = "exemplar store"
SCRAPE_READER = "scrape reader"
OTEL_OBSERVERS = "otel observers"
ORDER = (LOCK_DESCRIPTORS, VALUE_STORE, EXEMPLAR_STORE, SCRAPE_READER, OTEL_OBSERVERS)

fork_guard = threading.Lock()
_in_child: dict[str, Callable[[], None]] = {}


def after_fork_in_child(step: str, handler: Callable[[], None]) -> None:
    """Run `handler` in every forked child, at `step` of ``ORDER`` (one handler per step)."""
    if step not in ORDER:
        raise ValueError(f"unknown at-fork step {step!r}; one of {', '.join(ORDER)}")
    _in_child[step] = handler


def _child() -> None:
    fork_guard.release()
    for step in ORDER:
        handler = _in_child.get(step)
        if handler is not None:
            handler()


os.register_at_fork(before=fork_guard.acquire, after_in_parent=fork_guard.release, after_in_child=_child)
