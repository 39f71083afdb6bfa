"""The master<->worker contract: every name and byte layout both sides must agree on.

Owns: the environment a worker is started with (env.py), the sd_notify
messages a worker and a template send, with the client that sends them
(notify.py), the hand-off channel's address and message frames (wire.py),
and the layout of the workers' metric files (metricformat.py).

May import: the standard library only. Never another upgraderd package: the
master (core/, system/, metrics/) and the worker side (worker/, apps/) both
import this package, so anything it imported would sit on both sides of the
protocol (tests/unit/test_layers.py checks this). A change here is a change
of the protocol: workers started by an older master keep running through a
USR2 re-exec of a newer one, so names and layouts only ever grow.
"""
