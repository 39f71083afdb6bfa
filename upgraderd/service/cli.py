"""The `upgraderd` command line.

Exit codes:
  0  success
  1  the config is invalid, the first generation failed, or a reload failed
  2  usage error
  3  the master could not start (a listener could not be bound, already running)
  4  no master is running (reload, stop, status)
  5  timed out waiting for the outcome (reload, stop)
"""

from __future__ import annotations

import argparse
import os
import sys

from upgraderd import __version__
from upgraderd.config import schema as configmod
from upgraderd.config import validators
from upgraderd.errors import ConfigError, FatalError, UpgraderdError

EXIT_OK, EXIT_CONFIG, EXIT_USAGE, EXIT_START, EXIT_NOT_RUNNING = 0, 1, 2, 3, 4

EPILOG = ("exit codes: 0 ok; 1 invalid config, first generation failed or reload failed; "
          "2 usage; 3 could not start; 4 no master running; 5 timed out")
PIDFILE_HELP = ("pidfile of the master (default: the config's `pidfile`, else /run/upgraderd.pid "
                "as root and $XDG_RUNTIME_DIR/upgraderd.pid or /tmp/upgraderd-UID.pid otherwise)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="upgraderd", epilog=EPILOG,
        description="Zero-downtime upgrade daemon: owns the listening sockets, runs workers "
                    "in generations, and rolls a new generation on SIGHUP.")
    p.add_argument("--version", action="version", version=f"upgraderd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = _sub(sub, "run", "serve (in the foreground unless --daemon)",
               "Serve until TERM/QUIT (graceful stop) or INT (fast stop). HUP reloads the config, "
               "USR1 reopens the log file. The pidfile is written once generation 1 is ACTIVE.")
    _config_arg(run, configmod.DEFAULT_PATH)
    run.add_argument("--daemon", action="store_true",
                     help="detach into the background once serving (needs log.file in the config); "
                          "exits 0 when generation 1 is ACTIVE, non-zero with the reason otherwise")
    run.add_argument("--pidfile", metavar="PATH", help=PIDFILE_HELP)
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                     help="override the config's log.level")

    check = _sub(sub, "check", "validate a config file and exit 0 or 1",
                 "Validate FILE without touching a running master, like nginx -t, and print "
                 "every problem as file:line:column: key.path: message.")
    _config_arg(check, configmod.DEFAULT_PATH)

    reload = _sub(sub, "reload", "reload the running master and wait for the outcome",
                  "Send SIGHUP to the master named by the pidfile, then wait: exit 0 once the new "
                  "generation is ACTIVE; exit 1 with the reason if the config was rejected or the "
                  "new generation failed (the old one keeps serving either way).")
    _client_args(reload)
    reload.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                        help="give up waiting after this long (default: 120)")

    stop = _sub(sub, "stop", "stop the running master and wait until it has exited",
                "Send SIGTERM (drain every generation, then exit) or, with --fast, SIGINT.")
    _client_args(stop)
    stop.add_argument("--fast", action="store_true", help="fast stop: SIGKILL the workers after 1s")
    stop.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                      help="give up waiting after this long (default: 120)")

    status = _sub(sub, "status", "show the running master's generations and last reload",
                  "Print the master's pid and uptime, each generation with its state, workers, "
                  "pids and ages, and the last reload's result.")
    _client_args(status)
    status.add_argument("--json", action="store_true", help="print the raw status document")

    docs = _sub(sub, "docs", "print the configuration reference (Markdown)",
                "Print the reference generated from the option declarations.")
    docs.add_argument("-o", "--output", metavar="FILE", help="write it to FILE instead")
    return p


def _sub(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str,
         description: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description, epilog=EPILOG)


def _config_arg(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("-c", "--config", default=default, metavar="FILE",
                   help=f"config file (default: {default})" if default else
                   "config file whose `pidfile` names the master")


def _client_args(p: argparse.ArgumentParser) -> None:
    _config_arg(p, None)
    p.add_argument("--pidfile", metavar="PATH", help=PIDFILE_HELP)


def _print_problems(path: str, e: ConfigError) -> None:
    for problem in e.problems:
        print(problem, file=sys.stderr)
    print(f"{path}: {len(e.problems)} error(s)", file=sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the config; print every problem."""
    try:
        cfg = configmod.load(args.config)
    except ConfigError as e:
        _print_problems(args.config, e)
        return EXIT_CONFIG
    print(f"{args.config}: ok ({len(cfg.listeners)} listener(s), {cfg.workers.count} worker(s))")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """Serve, in the foreground or detached."""
    # prometheus-client picks multiprocess mode from this variable when it is first
    # imported (below, with the runner); the master must never be in that mode.
    for var in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"):
        if os.environ.pop(var, None) is not None:
            print(f"upgraderd: ignoring {var} from the environment: upgraderd sets it for its "
                  "workers", file=sys.stderr)
    from upgraderd.service.runner import run
    try:
        cfg = configmod.load(args.config)
    except ConfigError as e:
        _print_problems(args.config, e)
        return EXIT_CONFIG
    if args.daemon and not cfg.log.file:
        print(f"{args.config}: log.file: must be set for --daemon (a daemon has no terminal "
              "to log to)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return run(os.path.abspath(args.config), cfg, args.pidfile or cfg.pidfile_path,
                   daemon=args.daemon, log_level=args.log_level)
    except ConfigError as e:
        _print_problems(args.config, e)
        return EXIT_CONFIG
    except FatalError as e:
        print(f"upgraderd: cannot start: {e}", file=sys.stderr)
        return EXIT_START
    except UpgraderdError as e:
        print(f"upgraderd: {e}", file=sys.stderr)
        return EXIT_START


def _client_pidfile(args: argparse.Namespace) -> str:
    if args.pidfile:
        return str(args.pidfile)
    if args.config:
        return configmod.load(args.config).pidfile_path
    return validators.default_pidfile()


def cmd_client(args: argparse.Namespace) -> int:
    """Run `reload`, `stop` or `status` against the master named by the pidfile."""
    from upgraderd.service import control
    from upgraderd.service.pidfile import NotRunning
    try:
        pidfile = _client_pidfile(args)
    except ConfigError as e:
        _print_problems(args.config, e)
        print(f"upgraderd: {args.config} is invalid, so nothing was sent to the master "
              "(give --pidfile to reach it anyway)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if args.command == "reload":
            return control.reload(pidfile, args.timeout)
        if args.command == "stop":
            return control.stop(pidfile, args.fast, args.timeout)
        return control.show_status(pidfile, args.json)
    except NotRunning as e:
        print(f"upgraderd: {e}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except PermissionError as e:
        print(f"upgraderd: cannot signal the master: {e.strerror}", file=sys.stderr)
        return EXIT_NOT_RUNNING


def cmd_docs(args: argparse.Namespace) -> int:
    """Print or write the configuration reference."""
    from upgraderd.config import docgen
    return docgen.main([args.output] if args.output else [])


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = _parser().parse_args(argv)
    commands = {"run": cmd_run, "check": cmd_check, "reload": cmd_client, "stop": cmd_client,
                "status": cmd_client, "docs": cmd_docs}
    return commands[args.command](args)

