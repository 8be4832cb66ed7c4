"""A Flask service with promfork: HTTP metrics, an aggregated /metrics, and one metric of its own.

Run it under Gunicorn with the hooks in gunicorn.conf.py: ``gunicorn -c gunicorn.conf.py``.
"""

from flask import Flask
from prometheus_client import Counter

from promfork.flask import HttpMetrics

http_metrics = HttpMetrics()  # HTTP metrics and /metrics, settings from METRICS_*

# In multiprocess mode a metric lives in this worker's file, not in a registry (registry=None);
# /metrics adds up every worker's, dead ones included.
ITEMS_VIEWED = Counter("example_items_viewed", "Item pages served.", registry=None)


def create_app() -> Flask:
    app = Flask(__name__)
    http_metrics.init_app(app)

    @app.get("/hello")
    def hello():
        return {"message": "hello"}

    @app.get("/items/<item_id>")
    def read_item(item_id: str):
        ITEMS_VIEWED.inc()
        return {"item_id": item_id}

    return app
