"""prometheus-flask-exporter's Gunicorn integration around the same handler (needs the package)."""

from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics

from bench.apps.plain import create_app as create_plain


def create_app():
    app = create_plain()
    GunicornInternalPrometheusMetrics(app)
    return app
