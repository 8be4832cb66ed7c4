"""Gunicorn config for bench/otel.py: promfork's hooks for promfork, the multiprocess docs recipe otherwise."""

import os
import tempfile

wsgi_app = "bench.apps.otel_compare:create_app()"

if os.environ.get("BENCH_OTEL") == "promfork":
    from promfork import gunicorn

    gunicorn.install(globals())
elif os.environ.get("BENCH_OTEL") == "multiprocess":
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="bench-otel-"))

    def child_exit(server, worker):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
