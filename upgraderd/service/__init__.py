"""The operator's side: running upgraderd as a command and a service.

Owns: the CLI (cli.py), wiring and starting a master in the foreground
(runner.py) or detached (daemonize.py), the pidfile and its lock
(pidfile.py), the status file (status.py), the client commands
reload/stop/status (control.py), log set-up (logsetup.py) and what the
service does with the master's events (reporting.py).

May import anything in the package: this is the composition root.
"""
