"""End-to-end tests: the real daemon as a subprocess, real clients, real signals."""
