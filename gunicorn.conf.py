"""Gunicorn settings for the gateway. Every metrics hook lives in promfork.gunicorn.

Standard Gunicorn settings keep working unchanged: --bind, --workers,
WEB_CONCURRENCY, --max-requests and GUNICORN_CMD_ARGS override what is here.
"""

import os

from promfork import gunicorn as hooks
from webapp.settings import check_gateway_environment

# First, before anything imports prometheus_client: validate METRICS_* and export
# PROMETHEUS_MULTIPROC_DIR so the master and every worker share one directory.
hooks.prepare_environment()
check_gateway_environment()

wsgi_app = "webapp.app:create_app()"
bind = "127.0.0.1:8000"
workers = int(os.environ.get("WEB_CONCURRENCY") or 4)
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
graceful_timeout = 10

on_starting = hooks.on_starting
when_ready = hooks.when_ready
pre_fork = hooks.pre_fork
post_fork = hooks.post_fork
worker_abort = hooks.worker_abort
worker_exit = hooks.worker_exit
child_exit = hooks.child_exit
nworkers_changed = hooks.nworkers_changed
on_reload = hooks.on_reload
on_exit = hooks.on_exit
on_dirty_starting = hooks.on_dirty_starting
dirty_worker_exit = hooks.dirty_worker_exit
