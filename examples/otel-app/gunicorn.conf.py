"""Gunicorn settings for the OpenTelemetry example: its app and promfork's hooks from install()."""

from promfork import gunicorn

wsgi_app = "app:create_app()"

gunicorn.install(globals())  # last: exports PROMETHEUS_MULTIPROC_DIR and assigns every promfork hook
