"""OS-level tests: real sockets and processes, no daemon."""
