"""Process titles of the real daemon: what ps, top and pgrep show for each of its processes.

The master, the generation's template, the standby and each worker are read
back from /proc/PID/cmdline (ps, top -c, systemd-cgls) and /proc/PID/comm
(pgrep, top, ps -o comm), with the config's `name`.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from tests.support.upgraderd_proc import Daemon, echo_config, free_port, wait_until

pytestmark = pytest.mark.e2e


def title(pid: int) -> tuple[str, str]:
    """Return (cmdline as ps shows it, comm) of `pid`."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ")
    return cmdline.decode(), Path(f"/proc/{pid}/comm").read_text().strip()


def titles(d: Daemon) -> dict[str, str]:
    """Return {cmdline: comm} of the master's children."""
    out = {}
    for pid in d.workers():
        try:
            cmdline, comm = title(pid)
        except OSError:
            continue   # gone meanwhile
        out[cmdline] = comm
    return out


def test_master_template_standby_and_workers_have_titles_and_comms(tmp_path: Path) -> None:
    cfg = echo_config(free_port(), count=2, name="shop")
    cfg["workers"].update(prefork=True, warm=True)  # type: ignore[attr-defined]
    with Daemon(tmp_path, cfg).start() as d:
        assert title(d.pid) == ("upgraderd: master [shop]", "upgraderd")
        expected = {
            "upgraderd: template gen 1 [shop]": "upgraderd-tmpl",
            "upgraderd: worker gen 1 slot 0 [shop]": "upgraderd-work",
            "upgraderd: worker gen 1 slot 1 [shop]": "upgraderd-work",
            "upgraderd: standby [shop]": "upgraderd-tmpl",
        }
        seen = wait_until(lambda: (lambda t: t if t == expected else None)(titles(d)), 15,
                          f"the titles {expected}")
        assert seen == expected
        # pgrep matches comm: the master's workers, by their name.
        found = subprocess.run(["pgrep", "-P", str(d.pid), "-x", "upgraderd-work"],
                               capture_output=True, text=True, check=True).stdout.split()
        assert len(found) == 2
        # The title must not overwrite /proc/PID/environ: peers and a restarted master read it.
        for pid in found:
            assert b"\0UPGRADERD_GENERATION=1\0" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
        # Workers exec'd without a template (prefork: false) carry the same title.
        cfg["workers"].update(prefork=False, warm=False)  # type: ignore[attr-defined]
        del cfg["name"]
        d.write_config(cfg)
        d.send(signal.SIGHUP)
        d.wait_log(r"generation 1 DRAINING -> RETIRED")
        expected = {"upgraderd: worker gen 2 slot 0": "upgraderd-work",
                    "upgraderd: worker gen 2 slot 1": "upgraderd-work"}
        wait_until(lambda: titles(d) == expected, 15, f"the titles {expected}")
