"""The `upgraderd` command line.

Exit codes:
  0  success (`run` stopped gracefully, `check` found the config valid)
  1  the config is invalid, or the first generation failed
  2  usage error
  3  the master could not start (e.g. a listener could not be bound)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from upgraderd import __version__
from upgraderd import config as configmod
from upgraderd.errors import ConfigError, FatalError

EXIT_OK, EXIT_CONFIG, EXIT_USAGE, EXIT_START = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="upgraderd",
        description="Zero-downtime upgrade daemon: owns the listening sockets, runs workers "
                    "in generations, and rolls a new generation on SIGHUP.",
        epilog="Exit codes: 0 ok, 1 invalid config or first generation failed, 2 usage, "
               "3 could not start.")
    p.add_argument("--version", action="version", version=f"upgraderd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="serve in the foreground",
                         description="Serve in the foreground until TERM (graceful) or INT (fast).")
    run.add_argument("-c", "--config", default=configmod.DEFAULT_PATH, metavar="FILE",
                     help=f"config file (default: {configmod.DEFAULT_PATH})")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    check = sub.add_parser("check", help="validate a config file and exit 0 or 1",
                           description="Validate FILE without touching a running master, like nginx -t.")
    check.add_argument("-c", "--config", default=configmod.DEFAULT_PATH, metavar="FILE")
    return p


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()), stream=sys.stderr,
        format="%(asctime)s upgraderd[%(process)d] %(levelname)s %(message)s")


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the config; print every problem."""
    try:
        cfg = configmod.load(args.config)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        print(f"{args.config}: {len(e.problems)} error(s)", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.config}: ok ({len(cfg.listeners)} listener(s), {cfg.workers.count} worker(s))")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """Serve in the foreground."""
    _setup_logging(args.log_level)
    log = logging.getLogger("upgraderd")
    # prometheus-client picks multiprocess mode when it is imported, from this
    # variable; the master must never be in that mode (its metrics are its own).
    for var in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"):
        if os.environ.pop(var, None) is not None:
            log.warning("ignoring %s from the environment: upgraderd sets it for its workers", var)
    from upgraderd.master import Master
    from upgraderd.metrics import Telemetry
    try:
        return Master(args.config, telemetry=Telemetry.start).run()
    except ConfigError as e:
        log.error("invalid config:\n%s", e)
        return EXIT_CONFIG
    except FatalError as e:
        log.error("cannot start: %s", e)
        return EXIT_START


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = _parser().parse_args(argv)
    commands = {"run": cmd_run, "check": cmd_check}
    return commands[args.command](args)
