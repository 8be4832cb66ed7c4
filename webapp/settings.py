"""Gateway settings read from the environment, validated at start (no prometheus_client import)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from promfork.config import ConfigError

PROVIDERS = ("mock", "openai")
DEFAULT_OPENAI_MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "o4-mini")


@dataclass(frozen=True)
class GatewaySettings:
    """Which provider serves chat completions, and how."""

    provider: str = "mock"
    mock_latency_ms: int = 0
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: str | None = None
    openai_models: tuple[str, ...] = DEFAULT_OPENAI_MODELS
    upstream_timeout_s: float = 120.0
    max_body_bytes: int = 1 << 20
    api_keys: frozenset[str] = frozenset()
    rate_limit_rpm: int | None = None
    rate_limit_state: str | None = None


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ConfigError(f"{name}={raw!r} is not valid; use an integer from {low} to {high}")
    return value


def load_gateway_settings(environ: Mapping[str, str] | None = None) -> GatewaySettings:
    """Read LLM_PROVIDER and friends; raise ConfigError naming the first bad variable."""
    env = os.environ if environ is None else environ
    provider = env.get("LLM_PROVIDER", "").strip().lower() or "mock"
    if provider not in PROVIDERS:
        raise ConfigError(f"LLM_PROVIDER={env['LLM_PROVIDER']!r} is not supported; use one of: {', '.join(PROVIDERS)}")
    base_url = env.get("OPENAI_BASE_URL", "").strip() or GatewaySettings.openai_base_url
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"OPENAI_BASE_URL={base_url!r} is not an http(s) URL; use e.g. https://api.openai.com/v1")
    api_key = env.get("OPENAI_API_KEY", "").strip() or None
    if provider == "openai" and api_key is None:
        raise ConfigError("OPENAI_API_KEY is required when LLM_PROVIDER=openai")
    models_raw = env.get("OPENAI_MODELS", "").strip()
    models = tuple(m.strip() for m in models_raw.split(",") if m.strip()) if models_raw else DEFAULT_OPENAI_MODELS
    keys = frozenset(k.strip() for k in env.get("API_KEYS", "").split(",") if k.strip())
    rpm = _int(env, "RATE_LIMIT_RPM", 0, 0, 1_000_000) or None
    state = env.get("RATE_LIMIT_STATE", "").strip() or None
    return GatewaySettings(
        api_keys=keys,
        rate_limit_rpm=rpm,
        rate_limit_state=state,
        provider=provider,
        mock_latency_ms=_int(env, "MOCK_LATENCY_MS", 0, 0, 600_000),
        openai_base_url=base_url.rstrip("/"),
        openai_api_key=api_key,
        openai_models=models,
        upstream_timeout_s=float(_int(env, "UPSTREAM_TIMEOUT_S", 120, 1, 3600)),
        max_body_bytes=_int(env, "MAX_BODY_BYTES", 1 << 20, 1024, 1 << 30),
    )


def check_gateway_environment() -> GatewaySettings:
    """Validate the gateway variables in the Gunicorn master, exiting with a clear message if invalid.

    With RATE_LIMIT_RPM and no RATE_LIMIT_STATE, also create the shared limiter file
    and export its path, so that every worker (and a USR2 successor) uses the same one.
    """
    import atexit
    import sys
    import tempfile

    try:
        settings = load_gateway_settings()
    except ConfigError as exc:
        sys.exit(f"promfork: configuration error: {exc}")
    if settings.rate_limit_rpm and not settings.rate_limit_state:
        metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if metrics_dir:  # private to this deployment, and it lives as long as the directory
            path = os.path.join(metrics_dir, "ratelimit.state")
        else:
            base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
            fd, path = tempfile.mkstemp(prefix="promfork-ratelimit-", dir=base)
            os.close(fd)
            creator = os.getpid()
            atexit.register(lambda: os.getpid() == creator and os.path.exists(path) and os.unlink(path))
        os.environ["RATE_LIMIT_STATE"] = path
        settings = load_gateway_settings()
    return settings
