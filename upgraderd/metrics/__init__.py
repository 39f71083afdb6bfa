"""Prometheus metrics: what the master reports and how it reaches /metrics.

Owns: the collector computed at scrape time from the master's latest
snapshot and the counters declared in core/stats.py (telemetry.py), the
HTTP endpoint (endpoint.py), and the workers' multiprocess files (multiproc.py).

May import: `upgraderd.core` (snapshot, stats), `upgraderd.config`,
`upgraderd.system.signals`, `upgraderd.errors`. Never `upgraderd.service`.
"""
