"""The exceptions upgraderd raises (ordinary Exceptions, never control flow) and its exit codes."""

from __future__ import annotations

import enum


class UpgraderdError(Exception):
    """Base class of every error upgraderd reports to the operator."""


class ConfigError(UpgraderdError):
    """One or more problems in a config file, each with its location."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class SpawnError(UpgraderdError):
    """A worker process could not be started."""


class FatalError(UpgraderdError):
    """The master cannot start or continue (a bind failure at start-up, say)."""


class ExitCode(enum.IntEnum):
    """Every exit status of the `upgraderd` command, in one place (see README, Commands).

    The values follow LSB init-script conventions where one applies: `stop` on a
    stopped service succeeds, `status` says 3 when no master runs, and 4, 6 and
    7 mean what LSB says they mean, so systemd and init tooling read them right.
    """

    OK = 0
    #: The config is invalid, the first generation failed, a reload, upgrade or
    #: scale step was rejected or failed, or `-c` named a file the master does not read.
    FAILED = 1
    USAGE = 2
    #: `run`: the master could not start (address in use, already running, the daemon died).
    #: `status` uses the same value in LSB's sense, "not running": see STATUS_NOT_RUNNING.
    CANNOT_START = 3
    #: The master could not be signalled: insufficient privilege (LSB 4).
    NO_PERMISSION = 4
    #: Timed out waiting for the outcome (reload, upgrade, scale, stop).
    TIMEOUT = 5
    #: No config file was given and none exists where one is looked for (LSB 6, "not configured").
    NOT_CONFIGURED = 6
    #: No master is running (reload, upgrade, scale, reopen; LSB 7).
    NOT_RUNNING = 7
    #: A detached master crashed with an unexpected exception (sysexits EX_SOFTWARE).
    CRASHED = 70


#: LSB's `status` code for "program is not running"; the same number as CANNOT_START.
STATUS_NOT_RUNNING = ExitCode.CANNOT_START
