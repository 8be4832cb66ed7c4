"""Gunicorn settings for the FastAPI example: its app, an ASGI worker, promfork's hooks from install()."""

from promfork import gunicorn

wsgi_app = "app:app"
worker_class = "asgi"  # Gunicorn's native ASGI worker; or -k uvicorn_worker.UvicornWorker

gunicorn.install(globals())  # last: exports PROMETHEUS_MULTIPROC_DIR and assigns every promfork hook
