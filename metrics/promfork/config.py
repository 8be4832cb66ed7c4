"""Metrics settings read from the environment, validated once at start.

Every variable is parsed here and nowhere else, so a bad value stops the server
with a message that names the variable and what it accepts, before any worker
is forked.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

log = logging.getLogger("promfork.config")

DEFAULT_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class ConfigError(ValueError):
    """A setting has a value promfork cannot use; the message says which and why."""


@dataclass(frozen=True)
class Settings:
    """Validated metrics settings (see the README's environment table)."""

    enabled: bool = True
    multiproc_dir: str | None = None
    namespace: str = ""
    const_labels: Mapping[str, str] = field(default_factory=dict)
    latency_buckets: tuple[float, ...] = DEFAULT_LATENCY_BUCKETS
    auth_token: str | None = None
    metrics_port: int | None = None
    metrics_bind: str = "127.0.0.1"

    def metric_name(self, name: str) -> str:
        """The exposed name of a metric: `name` under the configured namespace."""
        return f"{self.namespace}_{name}" if self.namespace else name


def parse_bool(name: str, raw: str) -> bool:
    """Parse a boolean variable, accepting the usual spellings."""
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean; use one of: true, false, 1, 0, yes, no, on, off")


def parse_port(name: str, raw: str) -> int:
    """Parse a TCP port number (1-65535)."""
    try:
        port = int(raw.strip())
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise ConfigError(f"{name}={raw!r} is not a TCP port; use an integer from 1 to 65535")
    return port


def parse_namespace(raw: str) -> str:
    """Parse METRICS_NAMESPACE: empty, or a valid Prometheus metric name prefix."""
    value = raw.strip()
    if value and not _NAME.match(value):
        raise ConfigError(
            f"METRICS_NAMESPACE={raw!r} is not a valid metric name prefix; "
            "use letters, digits and underscores, not starting with a digit (or leave it empty)"
        )
    return value


def parse_const_labels(raw: str) -> dict[str, str]:
    """Parse METRICS_CONST_LABELS, a comma list of name=value pairs."""
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not _LABEL_NAME.match(name) or name.startswith("__"):
            raise ConfigError(
                f"METRICS_CONST_LABELS={raw!r}: {item!r} is not name=value with a valid label name; "
                "use e.g. service=gateway,env=prod"
            )
        if name in labels:
            raise ConfigError(f"METRICS_CONST_LABELS={raw!r}: label {name!r} is given twice")
        labels[name] = value.strip()
    return labels


def parse_buckets(raw: str) -> tuple[float, ...]:
    """Parse METRICS_LATENCY_BUCKETS, a comma list of increasing positive seconds."""
    try:
        buckets = tuple(float(part) for part in raw.split(",") if part.strip())
    except ValueError:
        buckets = ()
    valid = (
        buckets
        and all(math.isfinite(b) and b > 0 for b in buckets)
        and all(a < b for a, b in itertools.pairwise(buckets))
    )
    if not valid:
        raise ConfigError(
            f"METRICS_LATENCY_BUCKETS={raw!r} is not a list of bucket bounds; "
            "use strictly increasing positive seconds separated by commas, e.g. 0.05,0.1,0.5,1,5"
        )
    return buckets


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every metrics variable; raise ConfigError naming the first bad one."""
    env = os.environ if environ is None else environ

    def get(name: str) -> str | None:
        value = env.get(name)
        return value if value is not None and value.strip() != "" else None

    enabled = parse_bool("METRICS_ENABLED", get("METRICS_ENABLED") or "true")
    port_raw = get("METRICS_PORT")
    token = get("METRICS_AUTH_TOKEN")
    if token is not None and (token != token.strip() or any(c in token for c in "\r\n")):
        raise ConfigError("METRICS_AUTH_TOKEN must not contain spaces at its ends or line breaks")
    buckets_raw = get("METRICS_LATENCY_BUCKETS")
    multiproc_dir = get("PROMETHEUS_MULTIPROC_DIR")
    if multiproc_dir is None and get("prometheus_multiproc_dir") is not None:
        # prometheus-client still honours the lowercase name, with this warning.
        multiproc_dir = get("prometheus_multiproc_dir")
        log.warning(
            "promfork: prometheus_multiproc_dir variable has been deprecated in favor of the upper case naming "
            "PROMETHEUS_MULTIPROC_DIR; using %s",
            multiproc_dir,
        )
    return Settings(
        enabled=enabled,
        multiproc_dir=multiproc_dir,
        namespace=parse_namespace(env.get("METRICS_NAMESPACE", "")),
        const_labels=parse_const_labels(env.get("METRICS_CONST_LABELS", "")),
        latency_buckets=parse_buckets(buckets_raw) if buckets_raw else DEFAULT_LATENCY_BUCKETS,
        auth_token=token,
        metrics_port=parse_port("METRICS_PORT", port_raw) if port_raw else None,
        metrics_bind=(get("METRICS_BIND") or "127.0.0.1").strip(),
    )
