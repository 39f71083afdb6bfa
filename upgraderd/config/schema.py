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
import ipaddress
import os
import re
import shutil
import signal
import stat
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import yaml

from upgraderd.config import placeholders
from upgraderd.config.appspec import BUILTIN_APPS, app_name, boolean, module_problem
from upgraderd.errors import ConfigError
from upgraderd.config.validators import (
    REQUIRED, Invalid, Check, opt, integer, string, name, one_of,
    host, duration, signal_name, argv, env_map, directory, file_path, PATH_CHECKS,
    user_name, group_name, listen_address, default_pidfile, _show, _did_you_mean, parse_url, worker_ids,
)

DEFAULT_PATH = "config/upgraderd.yaml"
MODES = ("reuseport", "shared", "worker-bind")


# -- the schema --

@dataclass(frozen=True, kw_only=True)
class ListenerSpec:
    """One named listening address."""

    name: str = opt(REQUIRED, name, "Listener name; workers see it in LISTEN_FDNAMES.")
    host: str = opt("127.0.0.1", host, "Address to listen on (IPv4 or IPv6).")
    port: int = opt(REQUIRED, integer(1, 65535), "TCP port.")
    mode: str = opt("reuseport", one_of(*MODES), "Who binds and how the accept queue is shared.")
    backlog: int = opt(1024, integer(1, 65535), "listen() backlog of each socket.")

    @property
    def address(self) -> str:
        """Return host:port, with IPv6 hosts in brackets."""
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"{h}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class WorkerSpec:
    """What a worker process runs and how many of them."""

    count: int = opt(4, integer(1, 1024), "Number of worker processes (slots) per generation.")
    app: str | None = opt(None, app_name, "Built-in app (echo, http) or your own, "
                          "`package.module:factory`, forked from a template (see `prefork`).")
    command: tuple[str, ...] | None = opt(None, argv, "argv of the worker program (instead of app).")
    env: dict[str, str] = opt({}, env_map, "Extra environment variables for the workers.")
    cwd: str | None = opt(None, directory, "Working directory of the workers (default: the master's; / in daemon mode).")
    user: str | None = opt(None, user_name, "Run the workers as this user (the master must be root).")
    group: str | None = opt(None, group_name, "Run the workers with this group (default: the user's).")
    threads: int = opt(1, integer(1, 256), "Threads per worker of a built-in app (app only).")
    prefork: bool = opt(False, boolean, "Fork the workers of a built-in app from one template "
                        "process per generation (always on for `module:factory` apps).")
    warm: bool = opt(False, boolean, "With prefork: keep a standby interpreter with the standard "
                     "library, prometheus-client and upgraderd loaded; the next generation's template "
                     "imports only the app, fresh from disk.")


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
    dir: str | None = opt(None, string, "Directory of the workers' metric files, wiped at start "
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
    pidfile: str | None = opt(None, file_path, "Pidfile, written once the master serves "
                              "(default: /run/upgraderd.pid as root, else a per-user runtime path).")
    path: str = field(default="<string>", compare=False, metadata={"internal": True})

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
    "kernel": KernelSpec,
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
        if cls is Config and k in SECTIONS:
            sub = self.section(SECTIONS[k], vnode, key)
            return _BAD if sub is None else sub
        check = next(f for f in dataclasses.fields(cls) if f.name == k).metadata["check"]
        raw = self.value(vnode, key)
        if raw is _BAD:
            return _BAD
        if check in PATH_CHECKS and isinstance(raw, str) and raw:
            raw = os.path.join(self.base, raw)
        try:
            return check(raw)
        except Invalid as e:
            self.fail(vnode, key, str(e))
            return _BAD

    def listeners(self, node: yaml.Node, key: str) -> Any:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            self.fail(node, key, "expected a non-empty list of listeners")
            return _BAD
        if node.tag != "tag:yaml.org,2002:seq":
            self.fail(node, key, f"unsupported YAML tag {node.tag!r}; write a plain list")
            return _BAD
        out = [self.section(ListenerSpec, n, f"{key}[{i}]") for i, n in enumerate(node.value)]
        if any(x is None for x in out):
            return _BAD
        self.unique(node, key, out)
        return tuple(out)

    def unique(self, node: yaml.SequenceNode, key: str, listeners: list[ListenerSpec]) -> None:
        names: dict[str, int] = {}
        addrs: dict[tuple[str, int], int] = {}
        for i, spec in enumerate(listeners):
            item = node.value[i]
            if spec.name in names:
                self.fail(item, f"{key}[{i}].name",
                          f"duplicate listener name {spec.name!r} (also {key}[{names[spec.name]}])")
            names.setdefault(spec.name, i)
            addr = (str(ipaddress.ip_address(spec.host)), spec.port)
            if addr in addrs:
                self.fail(item, f"{key}[{i}]",
                          f"duplicate address {spec.address} (also {key}[{addrs[addr]}])")
            addrs.setdefault(addr, i)


_BAD: Any = object()


def _missing(fields: Mapping[str, Any], items: Mapping[str, Any]) -> bool:
    return any(f.metadata.get("required") and n not in items for n, f in fields.items())


def _join(prefix: str, key: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", key):
        return f"{prefix}[{_show(key)}]"  # a key path a terminal can show unambiguously
    return f"{prefix}.{key}" if prefix else key


def parse(text: str, path: str = "<string>") -> Config:
    """Parse and validate config text; raise ConfigError listing every problem."""
    loader = _Loader(path)
    root = _compose(text, path)
    if root is None:
        raise ConfigError([f"{path}: the file is empty; it needs at least `listeners:`"])
    cfg: Config | None = loader.section(Config, root, "")
    if cfg is not None:
        _check_workers(loader, root, cfg)
        _check_templates(loader, root, cfg)
    if loader.problems:
        raise ConfigError(loader.problems)
    assert cfg is not None
    return dataclasses.replace(cfg, path=path)


def _compose(text: str, path: str) -> yaml.Node | None:
    """Return the YAML node tree of `text`; raise a located ConfigError if it is not YAML."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        msg = e.problem or e.context or "invalid YAML"
        if e.context and e.problem and e.context_mark:
            msg += f" ({e.context} at {e.context_mark.line + 1}:{e.context_mark.column + 1})"
        raise ConfigError([f"{where}: YAML syntax error: {msg}"]) from None
    except yaml.reader.ReaderError as e:
        line, col = _line_col(text, e.position)
        raise ConfigError([f"{path}:{line}:{col}: YAML syntax error: character "
                           f"{_show(chr(e.character) if isinstance(e.character, int) else e.character)} "
                           f"is not allowed: {e.reason}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: YAML syntax error: {e}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: YAML syntax error: nested too deeply"]) from None


def _line_col(text: str | bytes, offset: int) -> tuple[int, int]:
    nl = "\n" if isinstance(text, str) else b"\n"
    line = text.count(nl, 0, offset) + 1  # type: ignore[arg-type]
    return line, offset - (text.rfind(nl, 0, offset) + 1) + 1  # type: ignore[arg-type]


def _node_at(node: yaml.Node, *path: str | int) -> yaml.Node | None:
    """Return the node at `path` (mapping keys and list indexes) below `node`, if any."""
    cur: yaml.Node | None = node
    for step in path:
        if isinstance(step, str) and isinstance(cur, yaml.MappingNode):
            cur = next((v for k, v in cur.value if isinstance(k, yaml.ScalarNode) and k.value == step), None)
        elif isinstance(step, int) and isinstance(cur, yaml.SequenceNode) and step < len(cur.value):
            cur = cur.value[step]
        else:
            return None
    return cur


def _check_workers(loader: _Loader, root: yaml.Node, cfg: Config) -> None:
    node = _node_at(root, "workers") or root
    w = cfg.workers
    if (w.app is None) == (w.command is None):
        loader.fail(node, "workers", "set exactly one of `app` (echo, http) or `command`")
        return
    if w.threads > 1 and w.app is None:
        loader.fail(_node_at(node, "threads") or node, "workers.threads",
                    "only the built-in apps take `threads`; a command manages its own threads")
    if w.user or w.group:
        _check_identity(loader, node, w)
    if cfg.ready.mode == "http" and not cfg.ready.url:
        rnode = _node_at(root, "ready") or root
        loader.fail(rnode, "ready.url", "ready.mode http needs a `url`")
    if w.app is not None and w.app not in BUILTIN_APPS:
        problem = module_problem(w.app.partition(":")[0], w.cwd, w.env)
        if problem:
            loader.fail(_node_at(node, "app") or node, "workers.app", problem)
    if w.command is not None:
        problem = _command_problem(w.command[0], w.env.get("PATH", os.environ.get("PATH", os.defpath)),
                                   w.cwd)
        if problem:
            loader.fail(_command_node(node, 0), "workers.command[0]", problem)


def _check_identity(loader: _Loader, node: yaml.Node, w: WorkerSpec) -> None:
    key = "user" if w.user else "group"
    where = _node_at(node, key) or node
    try:
        ids = worker_ids(w.user, w.group)
    except KeyError as e:
        loader.fail(where, f"workers.{key}", f"no such user or group: {e}")
        return
    if ids == (os.geteuid(), os.getegid()):
        return
    if os.geteuid() != 0:
        loader.fail(where, f"workers.{key}", f"{getattr(w, key)!r}: running workers as another "
                    "user or group needs a master started as root")
    elif shutil.which("setpriv") is None:
        loader.fail(where, f"workers.{key}", "running workers as another user needs setpriv (util-linux)")


def _command_problem(prog: str, env_path: str, cwd: str | None) -> str | None:
    """Say why `prog` cannot be executed, or return None if it can."""
    if "/" in prog:
        full = os.path.join(cwd or os.getcwd(), prog)
        if not os.path.exists(full):
            return f"{prog!r}: no such file"
        if os.path.isdir(full):
            return f"{prog!r} is a directory, not a program"
        if not os.access(full, os.X_OK):
            return f"{prog!r} is not executable (no x permission)"
        return None
    if shutil.which(prog, path=env_path):
        return None
    dirs = [d for d in env_path.split(os.pathsep) if d]
    present = [os.path.join(d, prog) for d in dirs if os.path.isfile(os.path.join(d, prog))]
    if present:
        return f"{prog!r} is on PATH at {present[0]} but is not executable"
    return f"{prog!r} is not on PATH ({env_path})"


def _command_node(wnode: yaml.Node, i: int) -> yaml.Node:
    """Return the node of workers.command[i] (the whole string if command is one string)."""
    return _node_at(wnode, "command", i) or _node_at(wnode, "command") or wnode


def _check_templates(loader: _Loader, root: yaml.Node, cfg: Config) -> None:
    """Check the placeholders of workers.command and ready.url, at their own lines."""
    if cfg.workers.command is not None:
        wnode = _node_at(root, "workers") or root
        for i, arg in enumerate(cfg.workers.command):
            for problem in placeholders.problems(arg, cfg):
                loader.fail(_command_node(wnode, i), f"workers.command[{i}]", problem)
    if cfg.ready.url is not None:
        unode = _node_at(root, "ready", "url") or _node_at(root, "ready") or root
        found = placeholders.problems(cfg.ready.url, cfg)
        if not found:
            sample = placeholders.values(cfg, 0, 1, probe_port=1)
            try:
                parse_url(placeholders.expand(cfg.ready.url, sample))
            except ValueError as e:
                found = [str(e)]
        for problem in found:
            loader.fail(unode, "ready.url", problem)
    lnode = _node_at(root, "listeners") or root
    seen: dict[str, str] = {}
    for i, spec in enumerate(cfg.listeners):
        var = placeholders.addr_env_name(spec.name)
        if var in seen:
            node = lnode.value[i] if isinstance(lnode, yaml.SequenceNode) else lnode
            loader.fail(node, f"listeners[{i}].name", f"{spec.name!r} and {seen[var]!r} would both "
                        f"set {var} in the workers' environment; rename one")
        seen.setdefault(var, spec.name)


def load(path: str) -> Config:
    """Read and validate the config file at `path`."""
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError([f"{path}: is a directory, not a config file"])
        if not stat.S_ISREG(st.st_mode):
            # Opening a FIFO would block `check` forever.
            raise ConfigError([f"{path}: is not a regular file"])
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line, col = _line_col(raw, e.start)
        raise ConfigError([f"{path}:{line}:{col}: cannot read: not UTF-8 text "
                           f"(byte {raw[e.start]:#04x})"]) from None
    return parse(text, path)
