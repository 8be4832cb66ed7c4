"""The master's own /metrics listener (METRICS_PORT): one thread, bounded whatever clients do.

It runs inside the Gunicorn master, so nothing a client does may make the master spend
without bound: a thread per connection (the design of prometheus-client's
``start_http_server`` and of wsgiref's threading server) lets a slowloris use up the
master's threads and, under a pids limit, every pid, after which Gunicorn can no longer
fork a worker. Here one thread runs a ``selectors`` loop over non-blocking sockets:

- at most ``Limits.max_connections`` connections are held; at the ceiling the oldest
  connection that has not sent a whole request is closed to make room, and a new
  connection is refused only when every held one is being answered;
- a request must arrive whole within ``request_timeout`` of its first byte (of the
  connection, for the first request); an idle keep-alive connection is closed after
  ``idle_timeout``; a response not taken by the client within ``write_timeout`` is dropped;
- the request head and body have size limits, answered with 431 and 413; a malformed
  request gets a 400 and the connection is closed;
- only a complete request reaches the WSGI app (the same app as the workers' /metrics),
  which renders one exposition in this thread.

Workers close their inherited copies of the listener and of every open connection right
after fork, so the port is the master's alone and is released when the master exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable
from email.utils import formatdate
from urllib.parse import unquote

log = logging.getLogger("promfork.reader.listener")

_HEAD_END = b"\r\n\r\n"
_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    505: "HTTP Version Not Supported",
}
_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one listener may hold; every figure bounds what a client can make the master spend."""

    max_connections: int = 64  # file descriptors held for clients (plus the listener and the selector)
    request_timeout: float = 5.0  # seconds from a request's first byte until it must be whole
    idle_timeout: float = 20.0  # a kept-alive connection between requests (Prometheus' 15 s interval fits)
    write_timeout: float = 10.0  # seconds for the client to take a whole response
    max_head_bytes: int = 8192  # request line and headers
    max_headers: int = 100
    max_body_bytes: int = 4096  # /metrics reads no body; a small one is read and ignored


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Connection:
    """One client socket and where it stands: reading a request, or writing a response."""

    __slots__ = ("address", "buffer", "deadline", "keep_alive", "out", "sent", "served", "sock", "writing")

    def __init__(self, sock: socket.socket, address, deadline: float) -> None:
        self.sock = sock
        self.address = address
        self.buffer = bytearray()
        self.deadline = deadline
        self.out = b""
        self.sent = 0
        self.served = 0
        self.writing = False
        self.keep_alive = False


class MetricsServer:
    """Serves a WSGI app on host:port from one background thread, within ``limits``."""

    def __init__(self, app: Callable, host: str, port: int, limits: Limits | None = None) -> None:
        self.app = app
        self.limits = limits or Limits()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # During a USR2 upgrade the old and the new master both listen; they serve the
            # same directory, so either may answer a scrape.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind((host, port))
            listener.listen(128)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self.server_address = listener.getsockname()
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, None)
        self._connections: dict[int, _Connection] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="promfork-metrics", daemon=True)

    @property
    def fileno(self) -> int:
        """The listening socket's descriptor."""
        return self._listener.fileno()

    @property
    def connection_count(self) -> int:
        """Client connections held right now."""
        return len(self._connections)

    def start(self) -> None:
        """Start answering."""
        self._thread.start()

    def close_in_child(self) -> None:
        """In a forked worker: drop the inherited listener and connections without touching the master's.

        Only this process's descriptors are closed; the selector is not asked to unregister
        anything (an epoll set is shared across fork, and the master's thread still uses it).
        """
        for connection in list(self._connections.values()):
            connection.sock.close()
        self._connections = {}
        self._listener.close()
        self._selector.close()

    def stop(self) -> None:
        """Stop answering and release the port."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for connection in list(self._connections.values()):
            self._close(connection)
        self._selector.close()
        self._listener.close()

    # The loop: everything below runs in the listener's thread only.

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                events = self._selector.select(timeout=0.5)
                now = time.monotonic()
                for key, mask in events:
                    if key.data is None:
                        self._accept(now)
                    elif mask & selectors.EVENT_WRITE:
                        self._write(key.data, now)
                    else:
                        self._read(key.data, now)
                self._expire(time.monotonic())
            except Exception:  # never let one client end the listener
                log.exception("promfork: metrics listener error (serving on)")
                time.sleep(0.05)

    def _accept(self, now: float) -> None:
        for _ in range(self.limits.max_connections):
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: try again on the next event
                log.warning("promfork: metrics listener cannot accept: %s", exc)
                return
            if len(self._connections) >= self.limits.max_connections and not self._evict_one():
                sock.close()  # every held connection is being answered: refuse
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(sock, address, now + self.limits.request_timeout)
            self._connections[sock.fileno()] = connection
            self._selector.register(sock, selectors.EVENT_READ, connection)

    def _evict_one(self) -> bool:
        """Close the connection that has waited longest without sending a whole request."""
        waiting = [c for c in self._connections.values() if not c.writing]
        if not waiting:
            return False
        # A connection that never completed a request goes before an idle keep-alive one
        # (a scraper that keeps its connection open between scrapes), oldest deadline first.
        self._close(min(waiting, key=lambda c: (c.served > 0, c.deadline)))
        return True

    def _expire(self, now: float) -> None:
        for connection in [c for c in self._connections.values() if c.deadline <= now]:
            if connection.buffer and not connection.writing:
                self._fail(connection, 408, "request not received in time", now)
            else:
                self._close(connection)

    def _read(self, connection: _Connection, now: float) -> None:
        try:
            data = connection.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(connection)
            return
        if not data:
            self._close(connection)
            return
        if not connection.buffer and connection.served:
            connection.deadline = now + self.limits.request_timeout  # a kept-alive connection starts a request
        connection.buffer += data
        self._next_request(connection, now)

    def _next_request(self, connection: _Connection, now: float) -> None:
        """Answer the request in the buffer if it is whole; otherwise keep reading within the limits."""
        try:
            request = _parse(connection.buffer, self.limits)
        except _BadRequest as exc:
            self._fail(connection, exc.status, str(exc), now)
            return
        if request is None:
            return
        environ, consumed = request
        del connection.buffer[:consumed]
        environ["REMOTE_ADDR"] = str(connection.address[0]) if connection.address else ""
        environ["SERVER_NAME"] = str(self.server_address[0])
        environ["SERVER_PORT"] = str(self.server_address[1])
        connection.keep_alive = _wants_keep_alive(environ)
        self._respond(connection, self._render(environ, connection.keep_alive), now)

    def _render(self, environ: dict, keep_alive: bool) -> bytes:
        """Call the WSGI app for one complete request; the whole response as bytes."""
        started: list = []

        def start_response(status, headers, exc_info=None):
            started[:] = [status, headers]
            return lambda chunk: None

        try:
            result = self.app(environ, start_response)
            try:
                body = b"".join(result)
            finally:
                if hasattr(result, "close"):
                    result.close()
            status, headers = started
        except Exception:
            log.exception("promfork: metrics listener cannot render /metrics")
            status, headers, body = "500 Internal Server Error", [("Content-Type", "text/plain")], b"render failed\n"
        headers = [(k, v) for k, v in headers if k.lower() != "connection"]
        if not any(k.lower() == "content-length" for k, _ in headers):
            headers.append(("Content-Length", str(len(body))))  # HEAD: the app's own length, if it gave one
        headers.append(("Date", formatdate(usegmt=True)))
        if environ["REQUEST_METHOD"] == "HEAD":
            body = b""
        return _head(status, headers, keep_alive) + body

    def _fail(self, connection: _Connection, status: int, message: str, now: float) -> None:
        body = f"{message}\n".encode()
        headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
        connection.keep_alive = False
        connection.buffer.clear()
        self._respond(connection, _head(f"{status} {_REASONS[status]}", headers, False) + body, now)

    def _respond(self, connection: _Connection, response: bytes, now: float) -> None:
        connection.out, connection.sent, connection.writing = response, 0, True
        connection.deadline = now + self.limits.write_timeout
        self._selector.modify(connection.sock, selectors.EVENT_WRITE, connection)
        self._write(connection, now)

    def _write(self, connection: _Connection, now: float) -> None:
        try:
            connection.sent += connection.sock.send(memoryview(connection.out)[connection.sent :])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(connection)
            return
        if connection.sent < len(connection.out):
            return
        if not connection.keep_alive:
            self._close(connection)
            return
        connection.served += 1
        connection.out, connection.sent, connection.writing = b"", 0, False
        connection.deadline = now + (self.limits.request_timeout if connection.buffer else self.limits.idle_timeout)
        self._selector.modify(connection.sock, selectors.EVENT_READ, connection)
        if connection.buffer:  # a pipelined request already arrived
            self._next_request(connection, now)

    def _close(self, connection: _Connection) -> None:
        fd = connection.sock.fileno()
        if self._connections.get(fd) is connection:
            del self._connections[fd]
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(connection.sock)
        connection.sock.close()


def _parse(buffer: bytearray, limits: Limits) -> tuple[dict, int] | None:
    """A WSGI environ and the bytes it used, once ``buffer`` holds a whole request; None until then."""
    end = buffer.find(_HEAD_END, 0, limits.max_head_bytes + len(_HEAD_END))
    if end < 0:
        if len(buffer) > limits.max_head_bytes:
            raise _BadRequest(431, f"request head over {limits.max_head_bytes} bytes")
        return None
    lines = bytes(buffer[:end]).split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0] or not set(parts[0]) <= _TOKEN_CHARS or not parts[1].startswith(b"/"):
        raise _BadRequest(400, "malformed request line")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if version.startswith(b"HTTP/"):
            raise _BadRequest(505, "only HTTP/1.0 and HTTP/1.1 are served")
        raise _BadRequest(400, "malformed request line")
    if len(lines) - 1 > limits.max_headers:
        raise _BadRequest(431, f"more than {limits.max_headers} header fields")
    environ = _environ(method, target, version)
    for line in lines[1:]:
        name, colon, raw = line.partition(b":")
        if not colon or not name or not set(name) <= _TOKEN_CHARS:
            raise _BadRequest(400, "malformed header field")
        key = "HTTP_" + name.decode("ascii").upper().replace("-", "_")
        if key in ("HTTP_CONTENT_LENGTH", "HTTP_CONTENT_TYPE"):
            key = key[5:]
        field = raw.strip(b" \t").decode("latin-1")
        if key in environ and key != "CONTENT_LENGTH":
            field = f"{environ[key]},{field}"
        elif key == "CONTENT_LENGTH" and key in environ and environ[key] != field:
            raise _BadRequest(400, "conflicting Content-Length")
        environ[key] = field
    if "HTTP_TRANSFER_ENCODING" in environ:
        raise _BadRequest(501, "Transfer-Encoding is not supported; send Content-Length")
    length_field = environ.get("CONTENT_LENGTH", "0")
    if not length_field.isdigit() or not length_field.isascii():
        raise _BadRequest(400, "malformed Content-Length")
    length = int(length_field)
    if length > limits.max_body_bytes:
        raise _BadRequest(413, f"request body over {limits.max_body_bytes} bytes")
    consumed = end + len(_HEAD_END) + length
    if len(buffer) < consumed:
        return None
    environ["wsgi.input"] = io.BytesIO(bytes(buffer[end + len(_HEAD_END) : consumed]))
    return environ, consumed


def _environ(method: bytes, target: bytes, version: bytes) -> dict:
    path, _, query = target.decode("latin-1").partition("?")
    return {
        "REQUEST_METHOD": method.decode("ascii"),
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote(path, encoding="latin-1"),
        "QUERY_STRING": query,
        "SERVER_PROTOCOL": version.decode("ascii"),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }


def _wants_keep_alive(environ: dict) -> bool:
    tokens = {t.strip().lower() for t in environ.get("HTTP_CONNECTION", "").split(",")}
    if environ["SERVER_PROTOCOL"] == "HTTP/1.1":
        return "close" not in tokens
    return "keep-alive" in tokens


def _head(status: str, headers: list[tuple[str, str]], keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers)]
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
