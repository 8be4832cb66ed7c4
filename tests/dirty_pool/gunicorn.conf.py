"""Gunicorn settings for the dirty-pool test project: two dirty workers, promfork's hooks from install()."""

from promfork import gunicorn

wsgi_app = "app:create_app()"
dirty_apps = ["app:TallyApp"]
dirty_workers = 2

gunicorn.install(globals())  # last: exports PROMETHEUS_MULTIPROC_DIR and assigns every promfork hook
