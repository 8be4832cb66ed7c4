"""Two instrumented Flask apps in one worker, and a user counter declared in each: two objects per series.

``app`` mounts ``inner`` under /inner with werkzeug's DispatcherMiddleware; both
serve ``GET /hello`` and count it in ``example_hellos_total``. Every series is
held by two metric objects in each worker; each update must count once.
"""

from flask import Flask
from prometheus_client import Counter
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from promfork.flask import HttpMetrics


def create_app(name: str) -> Flask:
    app = Flask(name)
    HttpMetrics().init_app(app)
    hellos = Counter("example_hellos", "Hellos served.", registry=None)  # a second object on the second call

    @app.get("/hello")
    def hello():
        hellos.inc()
        return {"hello": name}

    return app


app = DispatcherMiddleware(create_app("outer"), {"/inner": create_app("inner")})
