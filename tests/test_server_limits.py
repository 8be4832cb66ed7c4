"""The master's metrics listener is bounded whatever clients do (in-process, real sockets on loopback)."""

from __future__ import annotations

import http.client
import socket
import threading
import time

import pytest

from promfork.reader.listener import Limits, MetricsServer

BODY = b"# HELP up x\n# TYPE up gauge\nup 1.0\n"


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain; version=0.0.4")])
    return [BODY]


@pytest.fixture
def listener():
    servers = []

    def start(**limits) -> MetricsServer:
        server = MetricsServer(app, "127.0.0.1", 0, Limits(**limits))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def connect(server: MetricsServer) -> socket.socket:
    return socket.create_connection(server.server_address[:2], timeout=5)


def raw(server: MetricsServer, data: bytes) -> bytes:
    """Send `data`, return everything the server sends until it closes."""
    with connect(server) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def scrape_within(server: MetricsServer, timeout: float = 2.0) -> int:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.read() == BODY
        return response.status
    finally:
        conn.close()


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_keep_alive_serves_several_requests_on_one_connection(listener):
    server = listener()
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=5)
    for _ in range(3):
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200 and response.read() == BODY
    assert server.connection_count == 1
    conn.close()


def test_pipelined_requests_are_answered_in_order(listener):
    server = listener()
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = raw(server, request * 2 + b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.count(b"HTTP/1.1 200 OK") == 3 and answer.count(BODY) == 3


def test_head_has_no_body(listener):
    answer = raw(listener(), b"HEAD /metrics HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\n")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
        (b"GET /metrics HTTP/2.0\r\n\r\n", b"505"),
        (b"GET /metrics HTTP/1.1\r\nContent-Length: -1\r\n\r\n", b"400"),
        (b"GET /metrics HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", b"400"),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 999999\r\n\r\n", b"413"),
        (b"POST /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"501"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", b"431"),
        (b"GET /metrics HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", b"431"),
        (b"GET /metrics HTTP/1.1\r\nX-Big: " + b"b" * 9000, b"431"),  # never ends its head
    ],
)
def test_hostile_requests_get_a_4xx_and_a_closed_connection(listener, request_bytes, status):
    answer = raw(listener(), request_bytes)
    assert answer.split(b" ")[1] == status, answer[:200]


def test_a_request_that_never_completes_is_closed_after_the_request_timeout(listener):
    server = listener(request_timeout=0.5)
    with connect(server) as dripping, connect(server) as silent:
        dripping.sendall(b"GET /metr")
        started = time.monotonic()
        assert closed_by_peer(dripping, 5) and closed_by_peer(silent, 5)
        assert time.monotonic() - started < 4
    assert server.connection_count == 0


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(listener):
    server = listener(idle_timeout=0.5)
    with connect(server) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.1)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        assert closed_by_peer(sock, 5)


def test_slowloris_holds_no_thread_and_never_starves_a_scraper(listener):
    server = listener(max_connections=32)
    threads_before = threading.active_count()
    idle = []
    try:
        for _ in range(400):  # far past the ceiling: the oldest half-sent ones make room
            sock = connect(server)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            idle.append(sock)
        # A scraper that keeps its connection alive and a second scraper are both served.
        keep = http.client.HTTPConnection(*server.server_address[:2], timeout=2)
        for _ in range(3):
            keep.request("GET", "/metrics")
            assert keep.getresponse().read() == BODY
            assert scrape_within(server) == 200
            for _ in range(40):
                sock = connect(server)
                sock.sendall(b"GET /")
                idle.append(sock)
        keep.close()
        assert server.connection_count <= 32
        assert threading.active_count() == threads_before
    finally:
        for sock in idle:
            sock.close()


def test_at_the_ceiling_connections_being_answered_are_not_evicted(listener):
    server = listener(max_connections=2, request_timeout=5)
    with connect(server) as a, connect(server) as b:
        a.sendall(b"GET /metrics HTTP/1.1\r\n")
        b.sendall(b"GET /metrics HTTP/1.1\r\n")
        time.sleep(0.2)
        with connect(server) as c:  # evicts `a`, the oldest that has not sent a whole request
            c.sendall(b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
            assert closed_by_peer(a, 2)
            c.settimeout(2)
            assert c.recv(65536).startswith(b"HTTP/1.1 200")


def test_close_in_child_leaves_the_parent_serving(listener):
    import os

    server = listener()
    held = connect(server)
    held.sendall(b"GET /metrics HTTP/1.1\r\n")
    time.sleep(0.2)
    pid = os.fork()
    if pid == 0:  # the child drops its copies and exits at once
        server.close_in_child()
        os._exit(0)
    os.waitpid(pid, 0)
    held.sendall(b"Host: x\r\n\r\n")
    held.settimeout(2)
    assert held.recv(65536).startswith(b"HTTP/1.1 200")
    held.close()
    assert scrape_within(server) == 200
