"""Whole test scenarios that can also run in a child process (e.g. inside `unshare -n`)."""
