"""Unit tests: fake clock, fake processes, no daemon."""
