"""The exceptions upgraderd raises; all are ordinary Exceptions, none is control flow."""

from __future__ import annotations


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
