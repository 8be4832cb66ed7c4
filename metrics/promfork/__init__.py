"""promfork: exact, bounded Prometheus metrics for Python apps under Gunicorn's multiprocess workers.

Importing this package does nothing else: prometheus_client must not be imported
before PROMETHEUS_MULTIPROC_DIR is set (see ``promfork.gunicorn.prepare_environment``).

Public modules: ``gunicorn`` (the server hooks), ``flask`` (``HttpMetrics``),
``asgi`` (``PrometheusMiddleware``), ``exemplars`` (``record``), ``config``
(``Settings``). The rest is machinery, in rooms named for the process that runs them:

* ``writer/`` -- every process that records: the value store, its update
  functions, the exemplar store;
* ``reader/`` -- whichever process serves a scrape: reading, merging, rendering,
  the master's metrics listener;
* ``master/`` -- the Gunicorn master: the hooks' bodies, compaction, worker slots;
* ``directory/`` -- the shared directory: file names, file formats, locks, setup;
* ``http/`` -- the request path the framework adapters share;
* ``client``, ``forks``, ``config``, ``trace`` -- used by all of the above.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("promfork")
except _metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
