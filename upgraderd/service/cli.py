"""The `upgraderd` command line.

Exit codes are `upgraderd.errors.ExitCode`, documented in the README
(Commands and exit codes) and in every command's --help epilog.
"""

from __future__ import annotations

import argparse
import os
import sys

from upgraderd import __version__
from upgraderd.config import schema as configmod
from upgraderd.config import validators
from upgraderd.config.schema import Config
from upgraderd.errors import STATUS_NOT_RUNNING, ConfigError, ExitCode, FatalError, UpgraderdError
from upgraderd.service import defaults

EPILOG = ("exit codes: 0 ok (also `stop` with no master); 1 invalid config, or a reload, upgrade or "
          "scale failed, or -c names a file the master does not read; 2 usage; 3 could not start "
          "(`status`: no master running); 4 no permission to signal the master; 5 timed out; "
          "6 no config file found; 7 no master running")
PIDFILE_HELP = ("pidfile of the master (default: the config's `pidfile`, else /run/upgraderd.pid "
                "as root and $XDG_RUNTIME_DIR/upgraderd.pid or /tmp/upgraderd-UID.pid otherwise)")
CONFIG_HELP = (f"config file (default: ${defaults.ENV_VAR}, else config/upgraderd.yaml when run "
               f"from a source checkout, else {defaults.SYSTEM_PATH})")
CLIENTS = ("reload", "upgrade", "scale", "reopen", "stop", "status", "promote", "rollback")


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
    _config_arg(run, CONFIG_HELP)
    run.add_argument("--daemon", action="store_true",
                     help="detach into the background once serving (needs log.file in the config); "
                          "exits 0 when generation 1 is ACTIVE, non-zero with the reason otherwise")
    run.add_argument("--pidfile", metavar="PATH", help=PIDFILE_HELP)
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                     help="override the config's log.level")

    check = _sub(sub, "check", "validate a config file and exit 0 or 1",
                 "Validate FILE without touching a running master, like nginx -t, and print "
                 "every problem as file:line:column: key.path: message.")
    _config_arg(check, CONFIG_HELP)
    check.add_argument("--deep", action="store_true",
                       help="also import a `module:factory` app in a child process, as its "
                            "template will, and report its error at the `app:` key")
    check.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                       help="how long --deep waits for the import (default: 30)")

    preflight = _sub(sub, "preflight", "check that this upgraderd can run a master for FILE (USR2 runs it)",
                     "Import every module of this upgraderd and load FILE; exit 0 if both work. A "
                     "master runs this before it upgrades itself in place (SIGUSR2).")
    preflight.add_argument("-c", "--config", required=True, metavar="FILE", help="the config file")

    init = _sub(sub, "init", "write the shipped default config to PATH",
                f"Write the default config shipped with upgraderd (the echo service on "
                f"127.0.0.1:8090) to PATH (default: {defaults.SYSTEM_PATH}), as a starting point.")
    init.add_argument("path", nargs="?", default=defaults.SYSTEM_PATH, metavar="PATH")
    init.add_argument("--force", action="store_true", help="overwrite PATH if it exists")

    _waiting(_sub(sub, "reload", "reload the running master and wait for the outcome",
                  "Send SIGHUP to the master named by the pidfile, then wait: exit 0 once the new "
                  "generation is ACTIVE; exit 1 with the reason if the config was rejected or the "
                  "new generation failed (the old one keeps serving either way). With -c, FILE "
                  "must be the file the master reads."))
    _waiting(_sub(sub, "upgrade", "upgrade the master in place (USR2) and wait for the outcome",
                  "Send SIGUSR2: the master execs the upgraderd now on disk in place (same pid, "
                  "listeners and workers), then rolls a new generation. Exit 0 once that "
                  "generation is ACTIVE, 1 if the upgrade was refused or failed."))
    scale = _waiting(_sub(sub, "scale", "add (+N) or remove (-N) workers of the ACTIVE generation",
                          "Send N x SIGTTIN (+N) or SIGTTOU (-N), one at a time, each once the "
                          "previous one took effect. The next reload goes back to workers.count."))
    scale.add_argument("delta", type=_delta, metavar="+N|-N")
    _waiting(_sub(sub, "promote", "promote the canary under way now, and wait until it serves",
                  "End the rollout's window now (checks still running are stopped) and grow the "
                  "canary to workers.count; exit 0 once it is ACTIVE and the old generation drains."))
    _waiting(_sub(sub, "rollback", "roll the canary under way back, or return to the previous release",
                  "Abort the rollout: the canary drains and the old generation serves on; exit 0 "
                  "once the reload is reported rolled back. With no rollout under way, fork the "
                  "previous release from its kept template (rollout.keep_previous) into a new "
                  "generation; exit 0 once it is ACTIVE, 1 if no template is kept."))
    _client_args(_sub(sub, "reopen", "make the master reopen its log file (USR1)",
                      "Send SIGUSR1, for logrotate's postrotate."))

    stop = _waiting(_sub(sub, "stop", "stop the running master and wait until it has exited",
                         "Send SIGTERM (drain every generation, then exit) or, with --fast, "
                         "SIGINT. A master that is not running counts as stopped (exit 0)."))
    stop.add_argument("--fast", action="store_true", help="fast stop: SIGKILL the workers after 1s")

    status = _sub(sub, "status", "show the running master's generations and last reload",
                  "Print the master's pid and uptime, each generation with its state, workers, "
                  "pids and ages, and the last reload's result. Exit 3 if no master runs.")
    _client_args(status)
    status.add_argument("--json", action="store_true", help="print the raw status document")

    docs = _sub(sub, "docs", "print the configuration reference (Markdown)",
                "Print the reference generated from the option declarations.")
    docs.add_argument("-o", "--output", metavar="FILE", help="write it to FILE instead")
    return p


def _sub(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str,
         description: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description, epilog=EPILOG)


def _delta(text: str) -> int:
    """Parse `+N` or `-N` (N >= 1) for `scale`."""
    if len(text) < 2 or text[0] not in "+-" or not text[1:].isdigit() or int(text[1:]) == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected +N or -N, e.g. +2 or -1")
    return int(text)


def _config_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("-c", "--config", metavar="FILE", help=help)


def _client_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _config_arg(p, "config file: its `pidfile` names the master, and it must be the file "
                   "the master reads")
    p.add_argument("--pidfile", metavar="PATH", help=PIDFILE_HELP)
    return p


def _waiting(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _client_args(p)
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="give up waiting after this long (default: 120)")
    return p


def _print_problems(path: str, e: ConfigError) -> None:
    for problem in e.problems:
        print(problem, file=sys.stderr)
    print(f"{path}: {len(e.problems)} error(s)", file=sys.stderr)


def _default_config(args: argparse.Namespace) -> bool:
    """Fill in args.config when -c was not given; False (and a message) if none exists."""
    if args.config:
        return True
    found = defaults.find_config()
    if found.path is None:
        print(f"upgraderd: {found.missing_message()}", file=sys.stderr)
        return False
    args.config = found.path
    return True


def _load(args: argparse.Namespace) -> Config | ExitCode:
    """Find and load the config of `args`; print why and return the exit code if it cannot."""
    if not _default_config(args):
        return ExitCode.NOT_CONFIGURED
    try:
        return configmod.load(args.config)
    except ConfigError as e:
        _print_problems(args.config, e)
        return ExitCode.FAILED


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the config; print every problem."""
    cfg = _load(args)
    if isinstance(cfg, ExitCode):
        return cfg
    for warning in cfg.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    deep = ""
    if args.deep:
        from upgraderd.service import deepcheck
        problem = deepcheck.app_problem(cfg, args.timeout)
        if problem is not None:
            _print_problems(args.config, ConfigError([problem]))
            return ExitCode.FAILED
    elif cfg.workers.app is not None and ":" in cfg.workers.app:
        deep = f"; {cfg.workers.app} not imported: --deep imports it"
    print(f"{args.config}: ok ({len(cfg.listeners)} listener(s), {cfg.workers.count} worker(s){deep})")
    return ExitCode.OK


def cmd_preflight(args: argparse.Namespace) -> int:
    """Check that this code can import and load the config (run by a master before USR2)."""
    from upgraderd.service import preflight
    return preflight.run(args.config)


def cmd_init(args: argparse.Namespace) -> int:
    """Write the shipped default config."""
    try:
        defaults.write_starter(args.path, force=args.force)
    except FileExistsError:
        print(f"upgraderd: {args.path} exists; nothing written (--force overwrites it)",
              file=sys.stderr)
        return ExitCode.FAILED
    except OSError as e:
        print(f"upgraderd: cannot write {args.path}: {e.strerror or e}", file=sys.stderr)
        return ExitCode.FAILED
    print(f"wrote {args.path}: the echo service on 127.0.0.1:8090; edit it, then "
          f"`upgraderd check -c {args.path}`")
    return ExitCode.OK


def cmd_run(args: argparse.Namespace) -> int:
    """Serve, in the foreground or detached."""
    # prometheus-client picks multiprocess mode from this variable when it is first
    # imported (below, with the runner); the master must never be in that mode.
    for var in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"):
        if os.environ.pop(var, None) is not None:
            print(f"upgraderd: ignoring {var} from the environment: the master keeps its own "
                  "metrics in memory, and its workers' in upgraderd's files", file=sys.stderr)
    from upgraderd.service.runner import run
    cfg = _load(args)
    if isinstance(cfg, ExitCode):
        return cfg
    if args.daemon and not cfg.log.file:
        print(f"{args.config}: log.file: must be set for --daemon (a daemon has no terminal "
              "to log to); add e.g. `log: {file: /var/log/upgraderd.log}`, or run without --daemon",
              file=sys.stderr)
        return ExitCode.FAILED
    try:
        return run(os.path.abspath(args.config), cfg, args.pidfile or cfg.pidfile_path,
                   daemon=args.daemon, log_level=args.log_level)
    except ConfigError as e:
        _print_problems(args.config, e)
        return ExitCode.FAILED
    except FatalError as e:
        print(f"upgraderd: cannot start: {e}", file=sys.stderr)
        return ExitCode.CANNOT_START
    except UpgraderdError as e:
        print(f"upgraderd: {e}", file=sys.stderr)
        return ExitCode.CANNOT_START


def _client_pidfile(args: argparse.Namespace) -> str:
    if args.pidfile:
        return str(args.pidfile)
    if args.config:
        return configmod.load(args.config).pidfile_path
    return validators.default_pidfile()


def cmd_client(args: argparse.Namespace) -> int:
    """Run a client command against the master named by the pidfile."""
    from upgraderd.service.pidfile import NotRunning
    try:
        pidfile = _client_pidfile(args)
    except ConfigError as e:
        _print_problems(args.config, e)
        print(f"upgraderd: {args.config} is invalid, so nothing was sent to the master "
              "(give --pidfile to reach it anyway)", file=sys.stderr)
        return ExitCode.FAILED
    try:
        return _dispatch(args, pidfile)
    except NotRunning as e:
        if args.command == "stop":
            print(f"upgraderd: already stopped ({e})")
            return ExitCode.OK
        print(f"upgraderd: {e}", file=sys.stderr)
        return STATUS_NOT_RUNNING if args.command == "status" else ExitCode.NOT_RUNNING
    except PermissionError as e:
        print(f"upgraderd: cannot signal the master: {e.strerror}", file=sys.stderr)
        return ExitCode.NO_PERMISSION


def _dispatch(args: argparse.Namespace, pidfile: str) -> int:
    from upgraderd.service import control as c
    if args.command == "reload":
        return c.reload(pidfile, args.timeout, args.config)
    if args.command == "upgrade":
        return c.upgrade(pidfile, args.timeout, args.config)
    if args.command == "scale":
        return c.scale(pidfile, args.delta, args.timeout)
    if args.command == "reopen":
        return c.reopen(pidfile)
    if args.command in ("promote", "rollback"):
        return c.verdict(pidfile, args.command, args.timeout)
    if args.command == "stop":
        return c.stop(pidfile, args.fast, args.timeout)
    return c.show_status(pidfile, args.json)


def cmd_docs(args: argparse.Namespace) -> int:
    """Print or write the configuration reference."""
    from upgraderd.config import docgen
    return docgen.main([args.output] if args.output else [])


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = _parser().parse_args(argv)
    commands = {"run": cmd_run, "check": cmd_check, "init": cmd_init, "docs": cmd_docs,
                "preflight": cmd_preflight}
    return int(commands.get(args.command, cmd_client)(args))
