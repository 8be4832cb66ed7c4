"""Reading /metrics: fetch the exposition, parse it with prometheus_client.parser, sum samples.

Samples are keyed (name, sorted label items), so two scrapes compare key by key.
"""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def fetch(url: str, token: str | None) -> str:
    """The exposition text at `url`, with a bearer token when one is given."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 (a URL the operator gave)
    with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 (a URL the operator gave)
        return resp.read().decode()


def scrape(url: str, token: str | None) -> Samples:
    """Every sample of `url`."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(fetch(url, token))
        for s in family.samples
    }


def monotonic_samples(text: str) -> Samples:
    """Counter and histogram samples aggregated over workers (per-process ones restart with their process)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        if family.type in ("counter", "histogram") and not family.name.startswith("process_")
        for s in family.samples
    }


def metric_sum(samples: Samples, name: str, **labels: str) -> float:
    """Sum of `name` samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and wanted <= set(lab))


def label_values(samples: Samples, name: str, label: str, **labels: str) -> set[str]:
    """The values `label` takes among `name` samples whose labels include `labels`."""
    wanted = set(labels.items())
    return {
        dict(lab)[label] for (n, lab), _ in samples.items() if n == name and wanted <= set(lab) and label in dict(lab)
    }
