"""The OS side: the only code that makes syscalls on the master's behalf.

Owns: processes (process.py: posix_spawn, kill, waitpid), listening sockets
(sockets.py), the notify socket (notify.py), signal delivery (signals.py),
HTTP readiness probes (probe.py), kernel settings (kernel.py), the USR2 exec
(reexec.py), connections rescued from a slot without a worker (rescuer.py),
prefork templates' control channels (templatectl.py), a dead master's
orphans' sockets (orphanfds.py), refusing to start next to another master
(conflict.py), and posix.py, which assembles them into the core's `System`
and runs the select loop.

May import: `upgraderd.core` (for the seams' types), `upgraderd.config`,
`upgraderd.contract`, `upgraderd.errors`, and `upgraderd.worker` (the
hand-off library, which the master uses as a giver in rescuer.py; the worker
side never imports back). Never `upgraderd.service` or `upgraderd.metrics`.
"""
