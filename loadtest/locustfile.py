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
        with self.client.request(
            spec.method, spec.path, data=spec.body, headers=headers, name=spec.kind, catch_response=True
        ) as resp:
            if resp.status_code != spec.status:
                resp.failure(f"{spec.kind}: expected {spec.status}, got {resp.status_code}")
            else:
                resp.success()
