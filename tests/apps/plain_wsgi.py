"""A WSGI app of no framework, instrumented with promfork.wsgi: routes by a table of its own.

``GET /hello``, ``GET /items/{id}`` (digits), ``GET /stream`` (chunked, counted
at its final chunk through ``environ["promfork.response_complete"]``); anything
else is a 404 no route matched.
"""

import re

from promfork.wsgi import PrometheusMiddleware

_ROUTES = [("/hello", re.compile(r"/hello")), ("/items/{id}", re.compile(r"/items/[0-9]+"))]


def route(environ: dict) -> str | None:
    """The template of the route this app matched for the request (kept by the app in the environ)."""
    return environ.get("plain.route")


def app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path == "/stream":
        environ["plain.route"] = "/stream"
        start_response("200 OK", [("Content-Type", "text/plain")])
        done = environ.get("promfork.response_complete")

        def chunks():
            yield b"one\n"
            yield b"two\n"
            if done is not None:
                done()
            yield b"end\n"

        return chunks()
    for template, pattern in _ROUTES:
        if pattern.fullmatch(path):
            environ["plain.route"] = template
            body = template.encode()
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
            return [body]
    start_response("404 Not Found", [("Content-Length", "0")])
    return [b""]


application = PrometheusMiddleware(app, route=route)
