"""Gunicorn settings for the Django example: its WSGI application and promfork's hooks from install()."""

from promfork import gunicorn

wsgi_app = "project.wsgi:application"  # or -k uvicorn_worker.UvicornWorker project.asgi:application

gunicorn.install(globals())  # last: exports PROMETHEUS_MULTIPROC_DIR and assigns every promfork hook
