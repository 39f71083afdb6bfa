"""The core: the master's decisions, with no OS in them.

Owns: the master loop's logic (master.py), the generation state machine
(generation.py), readiness strategies (readiness.py), worker launch
descriptions (launcher.py), reload tracking and outcomes (reloads.py), slot
scaling and socket retirement (slots.py), rescuing a dead slot's queue
(rescue.py), the USR2 hand-over (handover.py,
upgrade.py), counters (stats.py, durations.py), notify judging (notices.py),
the one projection of the state that metrics and status read (snapshot.py),
and the seams to the OS (seams.py).

May import: `upgraderd.config` (frozen, validated configs and pure helpers),
`upgraderd.errors`, and the standard library's pure modules. Never
`upgraderd.system`, `.service` or `.metrics`, nor `os`, `socket`, `select` or
`subprocess`: every effect goes through a seam in seams.py, which
system/posix.py implements and tests fake (tests/unit/test_layers.py checks this).
"""
