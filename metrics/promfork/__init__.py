"""promfork: exact, bounded Prometheus metrics for Python apps under Gunicorn's multiprocess workers.

Importing this package does nothing else: prometheus_client must not be imported
before PROMETHEUS_MULTIPROC_DIR is set (see ``promfork.gunicorn.prepare_environment``).
The public modules are ``promfork.gunicorn`` (the server hooks), ``promfork.flask``
(``HttpMetrics``) and ``promfork.config`` (``Settings``); the rest is machinery.
"""
