"""Gunicorn settings for the FastAPI example: its app, an ASGI worker, promfork's hooks."""

from promfork import gunicorn as hooks

hooks.prepare_environment()  # first: exports PROMETHEUS_MULTIPROC_DIR before prometheus_client loads

wsgi_app = "app:app"
worker_class = "asgi"  # Gunicorn's native ASGI worker; or -k uvicorn_worker.UvicornWorker
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
on_dirty_starting = hooks.on_dirty_starting  # Gunicorn 27 dirty worker pools
dirty_worker_exit = hooks.dirty_worker_exit
