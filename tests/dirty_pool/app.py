"""A test-only project for Gunicorn 27's dirty worker pools: a dirty app counting its calls, a Flask app calling it.

The counter is defined at module level, as users do: Gunicorn imports this
module in the master first (the dirty arbiter reads the app's ``workers``
attribute before it forks), so the metric exists before the dirty workers do
and each of them writes it into its own file.
"""

import os

from flask import Flask
from gunicorn.dirty import DirtyApp, DirtyError, get_dirty_client
from prometheus_client import Counter

from promfork.flask import HttpMetrics

DIRTY_CALLS = Counter("dirty_calls", "Calls served by a dirty worker.", registry=None)


class TallyApp(DirtyApp):
    """Counts each call in the dirty worker that serves it and says which worker that was."""

    def count(self) -> dict:
        DIRTY_CALLS.inc()
        return {"pid": os.getpid()}


def create_app() -> Flask:
    app = Flask(__name__)
    HttpMetrics().init_app(app)

    @app.post("/dirty")
    def dirty():
        try:
            return get_dirty_client().execute("app:TallyApp", "count")
        except DirtyError as exc:  # e.g. the dirty worker serving the call was killed
            return {"error": str(exc)}, 503

    return app
