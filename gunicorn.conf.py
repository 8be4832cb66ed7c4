"""Gunicorn settings for the gateway; every metrics hook comes from promfork.gunicorn.install.

Standard Gunicorn settings keep working unchanged: --bind, --workers,
WEB_CONCURRENCY, --max-requests and GUNICORN_CMD_ARGS override what is here.
"""

import os

from promfork import gunicorn
from webapp.settings import check_gateway_environment

wsgi_app = "webapp.app:create_app()"
bind = "127.0.0.1:8000"
workers = int(os.environ.get("WEB_CONCURRENCY") or 4)
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
graceful_timeout = 10

gunicorn.install(globals())  # exports PROMETHEUS_MULTIPROC_DIR and assigns every promfork hook
check_gateway_environment()  # after install: the rate limiter keeps its state in the metrics directory
