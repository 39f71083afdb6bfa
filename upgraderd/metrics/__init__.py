"""Prometheus metrics: what the master reports and how it reaches /metrics.

Owns: the collector computed at scrape time from the master's latest
snapshot and the counters declared in core/stats.py (telemetry.py), the
HTTP endpoint (endpoint.py), and the workers' metric files: their directory
and archive (multiproc.py), their bounded reader (dbfile.py) and the sum over
workers (families.py); the files' layout is the contract's
(contract/metricformat.py).

May import: `upgraderd.core` (snapshot, stats), `upgraderd.config`,
`upgraderd.contract`, `upgraderd.system.signals`, `upgraderd.errors`. Never
`upgraderd.service`.
"""
