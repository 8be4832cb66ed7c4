"""The master's own /metrics listener (METRICS_PORT): scrapes never wait for a busy worker.

A small threaded WSGI server in a daemon thread of the Gunicorn master, serving
the same app as the workers' /metrics (auth, OpenMetrics, gzip). Workers close
their inherited copy of the listening socket right after fork, so the port is
the master's alone and is released when the master exits.
"""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    # During a USR2 upgrade the old and the new master both listen; they serve the
    # same directory, so either may answer a scrape.
    allow_reuse_port = True


class _QuietHandler(WSGIRequestHandler):
    # wsgiref sends the headers and the body in two writes: without TCP_NODELAY the body
    # can wait for the client's (possibly delayed) ACK of the headers.
    disable_nagle_algorithm = True

    def log_message(self, format, *args):
        pass


class MetricsServer:
    """Serves a WSGI app on host:port from a background thread."""

    def __init__(self, app, host: str, port: int) -> None:
        server_class = _ThreadingWSGIServer
        if ":" in host:
            server_class = type("_ThreadingWSGIServer6", (_ThreadingWSGIServer,), {"address_family": socket.AF_INET6})
        self.httpd = make_server(host, port, app, server_class=server_class, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="promfork-metrics", daemon=True)

    @property
    def fileno(self) -> int:
        """The listening socket's descriptor."""
        return self.httpd.socket.fileno()

    def start(self) -> None:
        """Start answering."""
        self._thread.start()

    def close_in_child(self) -> None:
        """In a forked worker: drop the inherited listener without touching the master's thread."""
        self.httpd.socket.close()

    def stop(self) -> None:
        """Stop answering and release the port."""
        self.httpd.shutdown()
        self.httpd.server_close()
