"""The core: the master's decisions, with no OS in them.

Owns: the master, which coordinates the phases of a pass and builds the
owners (master.py); the owners of the state, each its only writer: the fleet
of generations, launches and templates (fleet.py, prefork.py), the reloads
with the file watch (reloads.py, watching.py), the slots with steering and
rescue (slots.py, rescue.py), the USR2 re-exec of the master (selfexec.py,
with its hand-over record, handover.py), the published snapshot and metrics
endpoint (publish.py, snapshot.py), a dead master's orphans (takeover.py);
the events they report and the bus (events.py); the counters, which subscribe
to those events (stats.py, durations.py); the generation state machine
(generation.py), readiness strategies (readiness.py), worker launch
descriptions (launch.py), notify judging (notices.py); and the seams to the
OS (seams.py).

May import: `upgraderd.config` (frozen, validated configs and pure helpers),
`upgraderd.errors`, and the standard library's pure modules. Never
`upgraderd.system`, `.service` or `.metrics`, nor `os`, `socket`, `select` or
`subprocess`: every effect goes through a seam in seams.py, which
system/posix.py implements and tests fake (tests/unit/test_layers.py checks this).
No module here imports another back (no cycle, `TYPE_CHECKING` imports
included), and only master.py knows `Master`.
"""
