"""Gunicorn settings for the dirty-pool test project: two dirty workers, promfork's hooks."""

from promfork import gunicorn as hooks

hooks.prepare_environment()

wsgi_app = "app:create_app()"
dirty_apps = ["app:TallyApp"]
dirty_workers = 2
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
