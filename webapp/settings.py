"""Gateway settings read from the environment, validated at start (no prometheus_client import)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from promfork.config import ConfigError
from webapp.pricing import BUILT_IN_PRICES, Price, load_prices

PROVIDERS = ("mock", "openai")
DEFAULT_TENANT = "default"  # requests without a named key: no API_KEYS, or a plain key
OTHER_TENANT = "other"  # named keys beyond METRICS_MAX_TENANTS
_TENANT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
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
    api_keys: Mapping[str, str] = field(default_factory=dict)  # key -> tenant label (capped, see tenants)
    rate_limit_rpm: int | None = None
    rate_limit_state: str | None = None
    prices: Mapping[str, Price] = field(default_factory=lambda: dict(BUILT_IN_PRICES))
    tenant_label: bool = False
    max_tenants: int = 50


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


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    value = _BOOLEANS.get(raw.lower())
    if value is None:
        raise ConfigError(f"{name}={raw!r} is not valid; use true or false")
    return value


def parse_api_keys(raw: str, max_tenants: int) -> dict[str, str]:
    """API_KEYS as key -> tenant label: ``name:key`` entries name a tenant, plain keys are `default`.

    The first `max_tenants` distinct names (in the order given) keep their name; the
    rest share `other`, so the tenant label's series stay bounded.
    """
    keys: dict[str, str] = {}
    named: list[str] = []
    for entry in (e.strip() for e in raw.split(",")):
        if not entry:
            continue
        name, sep, key = entry.partition(":")
        if not sep:
            keys[entry] = DEFAULT_TENANT
            continue
        name, key = name.strip(), key.strip()
        if not key or not name or not set(name) <= _TENANT_CHARS or len(name) > 64:
            raise ConfigError(
                f"API_KEYS entry {name[:20]!r}:... is not valid; use key or name:key, comma-separated, "
                "with names of letters, digits, '_', '.', '-' (at most 64)"
            )
        if name not in named:
            named.append(name)
        keys[key] = name if named.index(name) < max_tenants else OTHER_TENANT
    return keys


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
    max_tenants = _int(env, "METRICS_MAX_TENANTS", 50, 1, 10_000)
    keys = parse_api_keys(env.get("API_KEYS", ""), max_tenants)
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
        prices=load_prices(env),
        tenant_label=_bool(env, "METRICS_TENANT_LABEL", False),
        max_tenants=max_tenants,
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
