"""Built-in worker programs: `python -m upgraderd.apps.echo` and `upgraderd.apps.http`.

These run as workers, never in the master. May import: `upgraderd.worker`
(the worker-side library). Their connection metrics are written in
prometheus-client's file layout without importing it (metricfile.py).
"""
