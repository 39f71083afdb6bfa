"""upgraderd: a zero-downtime upgrade daemon.

A master process owns the listening sockets and runs worker processes in
generations; SIGHUP starts a new generation and drains the old one only once
every new worker has said it is ready.
"""

__version__ = "0.1.0"
