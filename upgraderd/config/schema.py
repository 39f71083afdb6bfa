"""Load the YAML config into frozen dataclasses, validating strictly.

Every option is declared once, as a dataclass field built by `opt()`: its type
check, default and one-line doc live together, and the reference document is
generated from them. The loader walks PyYAML's node tree (not the constructed
Python objects) so that every problem can name `file:line:column`, the key path
(`listeners[1].port`) and the offending value. Problems are collected, not
raised one at a time, so `upgraderd check` can print all of them.

Invariant: a `Config` is immutable. A reload builds a new one and diffs it
against the old (see plan.py); nothing ever mutates a loaded config.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from upgraderd.config import checks, source, unixlisten
from upgraderd.config.rolloutspec import RolloutSpec
from upgraderd.config.source import MAX_BYTES, MAX_VALUES  # noqa: F401 (part of this module's API)
from upgraderd.config.watchlist import watch_paths
from upgraderd.config.appspec import BUILTIN_APPS, app_name, boolean, module_list
from upgraderd.config.httpspec import HttpSpec
from upgraderd.errors import ConfigError
from upgraderd.config.validators import (
    REQUIRED, Invalid, opt, integer, string, name, one_of, words,
    host, duration, grace, signal_name, argv, env_map, directory, dir_path, file_path, PATH_CHECKS,
    user_name, group_name, listen_address, default_pidfile, _show, _did_you_mean,
)

DEFAULT_PATH = "config/upgraderd.yaml"
MODES = ("reuseport", "shared", "worker-bind")
PROTOCOLS = ("tcp", "udp")


# -- the schema --

@dataclass(frozen=True, kw_only=True)
class ListenerSpec:
    """One named listening address."""

    name: str = opt(REQUIRED, name, "Listener name; workers see it in LISTEN_FDNAMES.")
    host: str = opt("127.0.0.1", host, "Address to listen on (IPv4 or IPv6).")
    port: int | None = opt(None, integer(1, 65535), "TCP or UDP port (required unless `path` is given).")
    path: str | None = opt(None, unixlisten.socket_path, "Listen on this Unix socket file "
                           "instead of host/port (see docs/workers.md, \"Unix sockets\").")
    mode: str = opt("reuseport", one_of(*MODES), "Who binds and how the accept queue is shared "
                    "(with `path`: shared, the default and only choice).")
    backlog: int = opt(1024, integer(1, 65535), "listen() backlog of each socket (TCP only).")
    owner: str | None = opt(None, user_name, "With `path`: the socket file's owner (the master must be root).")
    group: str | None = opt(None, group_name, "With `path`: the socket file's group.")
    permissions: str | None = opt(None, unixlisten.permissions, "With `path`: the socket file's "
                                  "permissions, e.g. \"0660\" (default: 0666 less the master's umask).")
    protocol: str = opt("tcp", one_of(*PROTOCOLS), "tcp (stream) or udp (datagram sockets, "
                        "mode reuseport or shared; not with `path`).")
    flows: str = opt("none", one_of("none", "cookie"), "UDP, mode reuseport: `cookie` gives each "
                     "generation its own sockets and keeps a flow on the generation whose 4-byte cookie "
                     "its datagrams start with (docs/workers.md).")

    @property
    def address(self) -> str:
        """Return host:port (IPv6 hosts in brackets), or the path of a Unix socket."""
        if self.path is not None:
            return self.path
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"{h}:{self.port}"

    @property
    def socket_id(self) -> tuple[str, int, str]:
        """Return what names this listener's sockets: (host, port, mode), or (path, 0, mode)."""
        if self.path is not None:
            return (self.path, 0, self.mode)
        return (self.host, self.port or 0, self.mode)


@dataclass(frozen=True, kw_only=True)
class WorkerSpec:
    """What a worker process runs and how many of them."""

    count: int = opt(4, integer(1, 1024), "Number of worker processes (slots) per generation.")
    app: str | None = opt(None, app_name, "Built-in app (echo, http) or your own, "
                          "`package.module:factory`, forked from a template (see `prefork`); "
                          "`asgi:package.module:app` or `wsgi:...` for a web app (section `http`).")
    command: tuple[str, ...] | None = opt(None, argv, "argv of the worker program (instead of app).")
    env: dict[str, str] = opt({}, env_map, "Extra environment variables for the workers.")
    cwd: str | None = opt(None, directory, "Working directory of the workers (default: the master's; / in daemon mode).")
    user: str | None = opt(None, user_name, "Run the workers as this user (the master must be root).")
    group: str | None = opt(None, group_name, "Run the workers with this group (default: the user's).")
    threads: int = opt(1, integer(1, 256), "Threads per worker of a built-in app (app only).")
    prefork: bool = opt(False, boolean, "Fork the workers of a built-in app from one template "
                        "process per generation (always on for `module:factory` apps).")
    warm: bool = opt(False, boolean, "With prefork: keep a standby interpreter with the standard "
                     "library and upgraderd's worker library loaded; the next generation's template "
                     "imports only the app, fresh from disk.")
    preload: tuple[str, ...] = opt((), module_list, "With warm: modules the standby imports before the HUP "
                                   "(e.g. [fastapi]); changed on disk by then: a fresh template (docs/prefork.md).")
    preload_recorded: bool = opt(True, boolean, "With warm: the standby also imports what the previous "
                                 "template imported from the standard library and site-packages, checked "
                                 "the same way (docs/prefork.md, \"Recorded imports\").")


@dataclass(frozen=True, kw_only=True)
class ReadySpec:
    """When a new worker counts as ready."""

    mode: str = opt("notify", one_of("notify", "delay", "http"),
                    "notify: READY=1 via NOTIFY_SOCKET; delay: alive after `after`; http: `url` answers 2xx.")
    after: float = opt(1.0, duration, "With mode delay: how long a worker must stay alive.")
    timeout: float = opt(30.0, duration, "A generation not ready by then fails; the old one keeps serving.")
    url: str | None = opt(None, string, "With mode http: the per-worker health URL, "
                          "e.g. http://127.0.0.1:{probe_port}/healthz.")


@dataclass(frozen=True, kw_only=True)
class DrainSpec:
    """How an old generation is stopped."""

    signal: str = opt("TERM", signal_name, "Signal that asks a worker to stop accepting and finish.")
    timeout: float = opt(30.0, duration, "SIGKILL a draining worker after this long.")
    handoff: str = opt("auto", one_of("auto", "off"),
                       "Hand live connections to the new generation (built-in workers and "
                       "workers that announce a hand-off channel), or off: wait for them to end.")
    orphan_grace: float = opt(30.0, grace, "A worker whose master died keeps accepting this long "
                              "(or until a restarted master drains it), then drains.")


@dataclass(frozen=True, kw_only=True)
class RestartSpec:
    """Respawning workers that die while their generation is ACTIVE."""

    backoff: float = opt(0.1, duration, "First respawn delay; it doubles on each consecutive crash.")
    max_backoff: float = opt(5.0, duration, "Cap of the respawn delay.")
    crash_loop: int = opt(8, integer(1, 1000), "Consecutive quick crashes after which a slot is given up.")


@dataclass(frozen=True, kw_only=True)
class MetricsSpec:
    """The master's Prometheus endpoint."""

    listen: str | None = opt("127.0.0.1:9108", listen_address,
                             "host:port of /metrics, /healthz and /readyz; null disables it.")
    dir: str | None = opt(None, dir_path, "Directory of the workers' metric files, wiped at start "
                          "(default: a private temporary directory, removed at exit).")


@dataclass(frozen=True, kw_only=True)
class LogSpec:
    """The master's log."""

    format: str = opt("text", one_of("text", "json"), "One line per event: text or json.")
    level: str = opt("info", one_of("debug", "info", "warning", "error"), "Lowest level logged.")
    file: str | None = opt(None, file_path, "Log file (reopened on SIGUSR1); default: stderr.")


@dataclass(frozen=True, kw_only=True)
class KernelSpec:
    """Kernel settings upgraderd checks or sets."""

    tcp_migrate_req: str = opt("check", one_of("check", "set", "ignore"),
                               "net.ipv4.tcp_migrate_req: check and warn, set it to 1, or ignore it.")


@dataclass(frozen=True, kw_only=True)
class ReloadSpec:
    """Reload, as on SIGHUP, when a watched file or symlink really changes (inotify)."""

    watch: tuple[str, ...] = opt((), watch_paths, "Paths whose change triggers a reload: `config` (this "
                                 "file) or absolute paths, e.g. a deploy tool's `current` symlink.")
    debounce: float = opt(0.5, duration, "Wait until no change was seen for this long (a burst of "
                          "writes is one reload).")


@dataclass(frozen=True, kw_only=True)
class Config:
    """A whole, validated config file."""

    listeners: tuple[ListenerSpec, ...] = opt(REQUIRED, lambda v: v, "Listening sockets (at least one).")
    workers: WorkerSpec = opt(WorkerSpec(), lambda v: v, "Worker processes.")
    ready: ReadySpec = opt(ReadySpec(), lambda v: v, "Readiness of new workers.")
    drain: DrainSpec = opt(DrainSpec(), lambda v: v, "Draining of old workers.")
    restart: RestartSpec = opt(RestartSpec(), lambda v: v, "Respawn back-off.")
    metrics: MetricsSpec = opt(MetricsSpec(), lambda v: v, "Prometheus endpoint.")
    log: LogSpec = opt(LogSpec(), lambda v: v, "Logging.")
    kernel: KernelSpec = opt(KernelSpec(), lambda v: v, "Kernel settings.")
    reload: ReloadSpec = opt(ReloadSpec(), lambda v: v, "Reload on file change.")
    http: HttpSpec = opt(HttpSpec(), lambda v: v, "HTTP server of `asgi:` and `wsgi:` apps.")
    name: str | None = opt(None, name, "This instance's name, in its process titles "
                           "(`upgraderd: master [NAME]`, `upgraderd: worker gen 7 slot 2 [NAME]`).")
    rollout: RolloutSpec = opt(RolloutSpec(), lambda v: v, "Canary rollouts (docs/rollouts.md).")
    pidfile: str | None = opt(None, file_path, "Pidfile, written once the master serves "
                              "(default: /run/upgraderd.pid as root, else a per-user runtime path).")
    path: str = field(default="<string>", compare=False, metadata={"internal": True})
    # Keys the file sets that change nothing (checks.no_effect), located; `check` and reloads say so.
    warnings: tuple[str, ...] = field(default=(), compare=False, metadata={"internal": True})

    @property
    def worker_argv(self) -> tuple[str, ...]:
        """Return the argv a worker of this config runs."""
        if self.workers.command is not None:
            return self.workers.command
        if self.prefork:
            return (sys.executable, "-m", "upgraderd.apps.template", str(self.workers.app))
        return (sys.executable, "-m", f"upgraderd.apps.{self.workers.app}")

    @property
    def prefork(self) -> bool:
        """Return True if workers are forked from a template process of their generation."""
        w = self.workers
        return w.app is not None and (w.prefork or w.app not in BUILTIN_APPS)

    @property
    def fd_listeners(self) -> tuple[ListenerSpec, ...]:
        """Return the listeners the master passes to workers, in LISTEN_FDS order (fd 3, 4, ...).

        The one definition of that order: `{fd:NAME}` and the fds a worker inherits both use it.
        """
        return tuple(s for s in self.listeners if s.mode != "worker-bind")

    @property
    def pidfile_path(self) -> str:
        """Return the pidfile path, with the default applied."""
        return self.pidfile or default_pidfile()

    @property
    def drain_signal(self) -> signal.Signals:
        """Return the drain signal as a `signal.Signals`."""
        return signal.Signals[f"SIG{self.drain.signal}"]


SECTIONS: dict[str, type] = {
    "listeners": ListenerSpec, "workers": WorkerSpec, "ready": ReadySpec,
    "drain": DrainSpec, "restart": RestartSpec, "metrics": MetricsSpec, "log": LogSpec,
    "kernel": KernelSpec, "reload": ReloadSpec, "http": HttpSpec, "rollout": RolloutSpec,
}


class _Loader:
    """Walk a composed YAML node tree and collect located problems."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[str] = []
        real = os.path.exists(path) and not path.startswith("<")
        self.base = os.path.dirname(os.path.abspath(path)) if real else os.getcwd()

    def fail(self, node: yaml.Node | None, key: str, msg: str) -> None:
        where = self.path
        if node is not None:
            where += f":{node.start_mark.line + 1}:{node.start_mark.column + 1}"
        self.problems.append(f"{where}: {key}: {msg}" if key else f"{where}: {msg}")

    def value(self, node: yaml.Node, key: str) -> Any:
        """Construct the Python value of `node`; on failure record a problem, return _BAD."""
        # A fresh constructor each time: one that raised midway keeps stale state.
        try:
            return yaml.constructor.SafeConstructor().construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, KeyError, OverflowError) as e:
            what = e.problem if isinstance(e, yaml.MarkedYAMLError) and e.problem else str(e)
            self.fail(node, key, f"cannot read this value: {what}")
        except RecursionError:
            self.fail(node, key, "cannot read this value: nested too deeply")
        return _BAD

    def mapping(self, node: yaml.Node, key: str) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        if not isinstance(node, yaml.MappingNode):
            got = self.value(node, key)
            if got is not _BAD:
                self.fail(node, key, f"expected a mapping, got {_show(got)}")
            return None
        if node.tag != "tag:yaml.org,2002:map":
            self.fail(node, key, f"unsupported YAML tag {node.tag!r}; write a plain mapping")
            return None
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for knode, vnode in node.value:
            k = self.value(knode, key)
            if k is _BAD:
                continue
            if not isinstance(k, str):
                self.fail(knode, key, f"keys must be strings, got {_show(k)}")
            elif k in out:
                self.fail(knode, _join(key, k), "duplicate key")
            else:
                out[k] = (knode, vnode)
        return out

    def section(self, cls: type, node: yaml.Node, key: str) -> Any:
        items = self.mapping(node, key)
        if items is None:
            return None
        fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        kwargs: dict[str, Any] = {}
        for k, (knode, vnode) in items.items():
            if k in (later := getattr(cls, "NOT_YET", {})):
                self.fail(knode, _join(key, k), f"not supported yet ({later[k]}); remove the key")
                continue
            if k not in fields:
                hint = _did_you_mean(k, fields)
                self.fail(knode, _join(key, k), f"unknown key{hint}; allowed: {', '.join(fields)}")
                continue
            kwargs[k] = self.field(cls, k, vnode, _join(key, k))
        for f in fields.values():
            if f.metadata.get("required") and f.name not in items:
                self.fail(node, _join(key, f.name), "is required")
        if any(v is _BAD for v in kwargs.values()) or _missing(fields, items):
            return None
        return cls(**kwargs)

    def field(self, cls: type, k: str, vnode: yaml.Node, key: str) -> Any:
        if cls is Config and k == "listeners":
            return self.listeners(vnode, key)
        meta = next(f for f in dataclasses.fields(cls) if f.name == k).metadata
        nested = SECTIONS.get(k) if cls is Config else meta.get("section")   # config/rolloutspec.py `section`
        if nested is not None:
            sub = self.section(nested, vnode, key)
            return _BAD if sub is None else sub
        check = meta["check"]
        raw = self.value(vnode, key)
        if isinstance(raw, bool) and words(check) and isinstance(vnode, yaml.ScalarNode):
            # YAML 1.1 made `handoff: off` a boolean; a key that takes words gets the word.
            raw = vnode.value.lower()
        if raw is _BAD:
            return _BAD
        if check in PATH_CHECKS and isinstance(raw, str) and raw:
            raw = os.path.join(self.base, raw)
        try:
            return check(raw)
        except Invalid as e:
            self.fail(vnode, key, str(e))
        except (ValueError, TypeError, OverflowError) as e:
            # A validator that missed a case must still give a located error, not a traceback.
            self.fail(vnode, key, f"{_show(raw)} is not allowed here ({type(e).__name__}: {e})")
        return _BAD

    def listeners(self, node: yaml.Node, key: str) -> Any:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            self.fail(node, key, "expected a non-empty list of listeners")
            return _BAD
        if node.tag != "tag:yaml.org,2002:seq":
            self.fail(node, key, f"unsupported YAML tag {node.tag!r}; write a plain list")
            return _BAD
        out: list[Any] = [unixlisten.with_default_mode(self.section(ListenerSpec, n, f"{key}[{i}]"), n)
                          for i, n in enumerate(node.value)]
        if any(x is None for x in out):
            return _BAD
        checks.unique_listeners(self, node, key, out)
        return tuple(out)


_BAD: Any = object()


def _missing(fields: Mapping[str, Any], items: Mapping[str, Any]) -> bool:
    return any(f.metadata.get("required") and n not in items for n, f in fields.items())


def _join(prefix: str, key: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", key):
        return f"{prefix}[{_show(key)}]"  # a key path a terminal can show unambiguously
    return f"{prefix}.{key}" if prefix else key


def parse(text: str, path: str = "<string>") -> Config:
    """Parse and validate config text; raise ConfigError listing every problem."""
    if len(text) > MAX_BYTES:
        raise ConfigError([source.too_big(path, len(text), "characters")])
    loader = _Loader(path)
    root = source.compose(text, path)
    if root is None:
        raise ConfigError([f"{path}: the file is empty; it needs at least `listeners:`"])
    source.check_expansion(root, path)
    cfg: Config | None = loader.section(Config, root, "")
    if cfg is not None:
        unixlisten.check_listeners(loader, root, cfg)
        checks.check_workers(loader, root, cfg)
        checks.check_templates(loader, root, cfg)
        checks.check_protocols(loader, root, cfg)
        checks.check_rollout(loader, root, cfg)
    if loader.problems:
        raise ConfigError(loader.problems)
    assert cfg is not None
    return dataclasses.replace(cfg, path=path, warnings=tuple(checks.no_effect(root, cfg, path)))


def load(path: str) -> Config:
    """Read and validate the config file at `path`."""
    return parse(source.read_text(path), path)
