"""The gateway's metric catalogue: promfork's own metrics and the gateway's, as docs/metrics.md shows them.

python -m webapp.catalogue > docs/metrics.md
"""

from __future__ import annotations

from flask import Flask
from prometheus_client import CollectorRegistry

from promfork.catalogue import build_catalogue
from promfork.config import Settings
from webapp.telemetry import LLMTelemetry


def define_gateway_metrics(registry: CollectorRegistry, settings: Settings) -> None:
    """Create the gateway's LLM metrics in `registry`, as the app does at start."""
    app = Flask("catalogue")
    app.extensions["promfork"] = type("Ext", (), {"settings": settings, "registry": registry})()
    LLMTelemetry().init_app(app)


def gateway_catalogue() -> str:
    """docs/metrics.md as it should read."""
    return build_catalogue(define_gateway_metrics)


if __name__ == "__main__":
    print(gateway_catalogue(), end="")
