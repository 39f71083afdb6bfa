"""Built-in worker programs: `python -m upgraderd.apps.echo` and `upgraderd.apps.http`.

These run as workers, never in the master. May import: `upgraderd.worker`
(the worker-side library) and `upgraderd.contract` (the names and layouts the
master and workers share); nothing else of the project, not even for
annotations (tests/unit/test_layers.py checks this). Their connection metrics
are written in upgraderd's own file layout (contract/metricformat.py) by
metricfile.py, without prometheus-client.
"""
