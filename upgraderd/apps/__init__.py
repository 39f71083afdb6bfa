"""Built-in worker programs: `python -m upgraderd.apps.echo` and `upgraderd.apps.http`."""
