"""Scrape and parse a running daemon's /metrics, for tests and bench."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Key = tuple[str, tuple[tuple[str, str], ...]]


def metrics_url(config: dict[str, Any], path: str = "/metrics") -> str:
    """Return the URL of `path` on the metrics endpoint of a config dict."""
    return f"http://{config['metrics']['listen']}{path}"


def fetch(url: str, headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, str, dict[str, str]]:
    """GET `url`; return (status, body, headers) also for 4xx/5xx answers."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def parse(text: str) -> dict[Key, float]:
    """Return every sample of a text exposition by (sample name, sorted labels)."""
    out: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(config: dict[str, Any]) -> dict[Key, float]:
    """Scrape the daemon that runs `config`; fail on anything but 200."""
    status, body, _ = fetch(metrics_url(config))
    assert status == 200, (status, body)
    return parse(body)


def value(samples: dict[Key, float], metric: str, /, **labels: str) -> float:
    """Return one sample's value; KeyError names what is missing."""
    key = (metric, tuple(sorted(labels.items())))
    if key not in samples:
        have = sorted(k for k in samples if k[0] == metric)
        raise KeyError(f"no sample {key}; samples of {metric}: {have}")
    return samples[key]


def family_names(text: str) -> set[str]:
    """Return the sample names of an exposition (e.g. x_total, x_bucket, x_info)."""
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}
