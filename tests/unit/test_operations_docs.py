"""The operator's docs agree with each other and with the code: signals, exit codes, sockets."""

from __future__ import annotations

import re

from tests.support.upgraderd_proc import ROOT
from upgraderd.errors import ExitCode

README = (ROOT / "README.md").read_text()
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()
WORKERS = (ROOT / "docs" / "workers.md").read_text()


def _table_after(text: str, heading: str) -> list[str]:
    """Return the rows of the first Markdown table after `heading`."""
    rest = text[text.index(heading):]
    lines = rest.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        rows.append(ln)
    return rows


def test_every_signal_is_a_row_of_the_signals_table():
    rows = _table_after(README, "## Signals")
    firsts = [r.split("|")[1].strip() for r in rows[2:]]
    assert firsts == ["HUP", "TERM, QUIT", "INT", "USR2", "TTIN / TTOU", "USR1"]
    # No stray table row anywhere else in the section.
    section = README[README.index("## Signals"):README.index("## Commands and exit codes")]
    assert [ln for ln in section.splitlines() if ln.startswith("|")] == rows


def test_exit_code_tables_list_every_exit_code():
    documented = {ExitCode(c) for c in ExitCode if c is not ExitCode.CRASHED}
    for text, heading in ((README, "## Commands and exit codes"), (OPERATIONS, "## Commands and exit codes")):
        rows = _table_after(text, heading)
        codes = {int(r.split("|")[1]) for r in rows[2:]}
        assert codes == {int(c) for c in documented}, heading
        assert "already stopped" in rows[2] and "`status`: no master is running" in "".join(rows)


def test_workers_doc_and_readme_agree_on_sockets_closed_by_a_reload():
    assert "never close a socket during a reload" not in WORKERS
    assert "a reload to *fewer* workers" in WORKERS
    assert "a reload to fewer workers" in README


def test_operations_doc_ties_timeout_stop_sec_to_drain_timeout():
    assert "`TimeoutStopSec` to `drain.timeout` + 15 s" in OPERATIONS.replace("\n", " ")
    for field in ("`event`", "`generation`", "`slot`", "`worker_pid`"):
        assert field in OPERATIONS, field
