"""upgraderd's test suite: `unit/`, `os/`, `e2e/`, and the helpers they share in `support/`.

A package so that tests, scenarios run in child processes and `bench/` all
import the helpers the same way, `from tests.support... import ...`, from the
repository root (pytest puts it on sys.path; `python -m` runs from it).
"""
