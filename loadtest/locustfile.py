"""Locust users for the gateway, sending the same request mix as promfork-load.

    pip install locust
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000

Locust reports client-side numbers only; to check /metrics against what was
served, use promfork-load.
"""

from __future__ import annotations

import itertools

from locust import FastHttpUser, task

from promfork.loadtest.mix import RequestMix

_seeds = itertools.count(1)


class GatewayUser(FastHttpUser):
    """One simulated client drawing from the shared request mix."""

    def on_start(self) -> None:
        self.mix = RequestMix(seed=next(_seeds))

    @task
    def send(self) -> None:
        spec = self.mix.next()
        headers = {"Content-Type": "application/json"} if spec.body is not None else {}
        expected = {"plain": 200, "stream": 200, "tool": 200, "unmatched": 404}.get(spec.kind)
        with self.client.request(
            spec.method, spec.path, data=spec.body, headers=headers, name=spec.kind, catch_response=True
        ) as resp:
            if expected is not None and resp.status_code != expected:
                resp.failure(f"{spec.kind}: expected {expected}, got {resp.status_code}")
            elif expected is None and not 400 <= resp.status_code < 500:
                resp.failure(f"client_error: expected a 4xx, got {resp.status_code}")
            else:
                resp.success()
