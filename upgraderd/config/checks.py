"""Checks across fields of a parsed config, each reported at its own YAML line.

The loader (schema.py) validates each value alone; these checks need several
(a command that must exist on the workers' PATH, a user the master may switch
to, placeholders that must name listeners, listener names that must not clash
in the workers' environment). They run in `check`, at start and at reload
alike, so the three always agree.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
from typing import TYPE_CHECKING, Protocol

import yaml

from upgraderd.config import placeholders, trafficspec
from upgraderd.config.appspec import BUILTIN_APPS, app_module, module_problem
from upgraderd.config.validators import _show, parse_url, worker_ids
from upgraderd.contract.env import addr_env_name

if TYPE_CHECKING:
    from upgraderd.config.schema import Config, ListenerSpec, WorkerSpec


class Reporter(Protocol):
    """Where a check reports a problem: at a node, under a key path."""

    def fail(self, node: yaml.Node | None, key: str, msg: str) -> None:
        """Record `msg` for `key` at `node`'s line and column."""


def node_at(node: yaml.Node, *path: str | int) -> yaml.Node | None:
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


def check_workers(loader: Reporter, root: yaml.Node, cfg: Config) -> None:
    node = node_at(root, "workers") or root
    w = cfg.workers
    if (w.app is None) == (w.command is None):
        loader.fail(node, "workers", "set exactly one of `app` (echo, http) or `command`")
        return
    if w.threads > 1 and w.app is None:
        loader.fail(node_at(node, "threads") or node, "workers.threads",
                    "only the built-in apps take `threads`; a command manages its own threads")
    if w.user or w.group:
        _check_identity(loader, node, w)
    if cfg.ready.mode == "http" and not cfg.ready.url:
        rnode = node_at(root, "ready") or root
        loader.fail(rnode, "ready.url", "ready.mode http needs a `url`")
    if w.app is not None and w.app not in BUILTIN_APPS:
        problem = module_problem(app_module(w.app), w.cwd, w.env)
        if problem:
            loader.fail(node_at(node, "app") or node, "workers.app", problem)
    if w.command is not None:
        problem = _command_problem(w.command[0], w.env.get("PATH", os.environ.get("PATH", os.defpath)),
                                   w.cwd)
        if problem:
            loader.fail(_command_node(node, 0), "workers.command[0]", problem)


def _check_identity(loader: Reporter, node: yaml.Node, w: WorkerSpec) -> None:
    key = "user" if w.user else "group"
    where = node_at(node, key) or node
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
    return node_at(wnode, "command", i) or node_at(wnode, "command") or wnode


def check_templates(loader: Reporter, root: yaml.Node, cfg: Config) -> None:
    """Check the placeholders of workers.command and ready.url, at their own lines."""
    if cfg.workers.command is not None:
        wnode = node_at(root, "workers") or root
        for i, arg in enumerate(cfg.workers.command):
            for problem in placeholders.problems(arg, cfg):
                loader.fail(_command_node(wnode, i), f"workers.command[{i}]", problem)
    if cfg.ready.url is not None:
        unode = node_at(root, "ready", "url") or node_at(root, "ready") or root
        found = placeholders.problems(cfg.ready.url, cfg)
        if any(c.isspace() or not c.isprintable() for c in cfg.ready.url):
            found.append(f"{_show(cfg.ready.url)} contains whitespace or a control character; "
                         "percent-encode it")
        if not found:
            sample = placeholders.values(cfg, 0, 1, probe_port=1)
            try:
                parse_url(placeholders.expand(cfg.ready.url, sample))
            except ValueError as e:
                found = [str(e)]
        for problem in found:
            loader.fail(unode, "ready.url", problem)
    lnode = node_at(root, "listeners") or root
    seen: dict[str, str] = {}
    for i, spec in enumerate(cfg.listeners):
        var = addr_env_name(spec.name)
        if var in seen:
            node = lnode.value[i] if isinstance(lnode, yaml.SequenceNode) else lnode
            loader.fail(node, f"listeners[{i}].name", f"{spec.name!r} and {seen[var]!r} would both "
                        f"set {var} in the workers' environment; rename one")
        seen.setdefault(var, spec.name)


def check_protocols(loader: Reporter, root: yaml.Node, cfg: Config) -> None:
    """Refuse the settings a UDP listener cannot honour, at their own lines."""
    for i, spec in enumerate(cfg.listeners):
        item = node_at(root, "listeners", i) or root
        if spec.protocol != "udp":
            if spec.flows != "none":
                loader.fail(node_at(item, "flows") or item, f"listeners[{i}].flows",
                            "flows is for protocol udp; a TCP connection is its own flow")
            continue
        if spec.path is not None:
            loader.fail(node_at(item, "protocol") or item, f"listeners[{i}].protocol",
                        "a `path` listener is a Unix stream socket; protocol udp needs host and port")
            continue
        if spec.mode == "worker-bind":
            loader.fail(node_at(item, "mode") or item, f"listeners[{i}].mode",
                        "protocol udp needs mode reuseport or shared: the master holds UDP sockets "
                        "across generations, while worker-bind sockets close with each worker and "
                        "drop the datagrams queued on them")
        if cfg.workers.app == "http":
            loader.fail(node_at(item, "protocol") or item, f"listeners[{i}].protocol",
                        "the built-in http app does not answer UDP datagrams; use app echo, a "
                        "`module:factory` app whose protocol has datagram(), or a command")
        if spec.flows == "cookie" and spec.mode != "reuseport":
            loader.fail(node_at(item, "flows") or item, f"listeners[{i}].flows",
                        "flows: cookie needs mode reuseport (one socket per worker and generation)")
        backlog = node_at(item, "backlog")
        if backlog is not None:
            loader.fail(backlog, f"listeners[{i}].backlog",
                        "backlog is the listen() queue of a TCP socket; a UDP socket has none "
                        "(its queue is the receive buffer): remove the key")


def no_effect(root: yaml.Node, cfg: Config, path: str) -> list[str]:
    """Return a located warning for each key written in the file that changes nothing."""
    w = cfg.workers
    found: list[tuple[tuple[str, ...], str]] = []
    if not w.prefork and w.app is not None and ":" in w.app:
        found.append((("workers", "prefork"), "false has no effect: a `module:factory` app is "
                      "always forked from its generation's template"))
    if w.warm and not cfg.prefork:
        found.append((("workers", "warm"), "true has no effect without prefork: the standby is a "
                      "template started ahead of the next generation (set prefork: true, or use "
                      "a `module:factory` app)"))
    out = []
    for keys, msg in found:
        node = node_at(root, *keys)
        if node is not None:   # only keys the file sets: a default is no one's mistake
            out.append(f"{path}:{node.start_mark.line + 1}:{node.start_mark.column + 1}: "
                       f"{'.'.join(keys)}: {msg}")
    return out


def check_rollout(loader: Reporter, root: yaml.Node, cfg: Config) -> None:
    """Check the `rollout` section against the rest: the canary's size, the checks' templates."""
    r = cfg.rollout
    rnode = node_at(root, "rollout") or root
    if r.keep_previous > 0 and not cfg.prefork:
        loader.fail(node_at(rnode, "keep_previous") or rnode, "rollout.keep_previous",
                    "only a prefork app has a template to keep (workers.app with prefork, or a "
                    "module:factory or asgi:/wsgi: app); a command is exec'd anew at each start")
    if r.rollback == "manual" and r.strategy != "canary":
        loader.fail(node_at(rnode, "rollback") or rnode, "rollout.rollback",
                    "manual holds a failing canary for the operator; set rollout.strategy: canary")
    for key, owners in (("canary", ("canary",)), ("batches", ("batches",)), ("checks", ("canary", "batches"))):
        if r.strategy not in owners and (node := node_at(rnode, key)) is not None:
            who = " or ".join("a canary" if o == "canary" else o for o in owners)
            loader.fail(node, f"rollout.{key}", f"only {who} {'has' if owners == ('canary',) else 'have'} "
                        f"{key}; set rollout.strategy: {owners[0]} (or remove the key)")
    if r.strategy == "all-at-once":
        return
    for i, spec in enumerate(cfg.listeners):
        if spec.flows == "cookie":
            loader.fail(node_at(rnode, "strategy") or rnode, "rollout.strategy",
                        f"{'a canary' if r.strategy == 'canary' else 'batches'} cannot serve listeners[{i}] "
                        f"({spec.name}, flows: cookie) yet: new flows go to the serving generation's own "
                        f"sockets only, so the {'canary' if r.strategy == 'canary' else 'new workers'} would get none")
    if r.strategy == "canary" and r.canary.workers >= cfg.workers.count:
        loader.fail(node_at(rnode, "canary", "workers") or rnode, "rollout.canary.workers",
                    f"{r.canary.workers} is not less than workers.count ({cfg.workers.count}): "
                    "the canary would be the whole generation")
    http = r.checks.http
    if http is not None:
        unode = node_at(rnode, "checks", "http", "url") or rnode
        found = placeholders.problems(http.url, cfg)
        if not found:
            try:
                parse_url(placeholders.expand(http.url, placeholders.values(cfg, 0, 1, probe_port=1)))
            except ValueError as e:
                found = [str(e)]
        for problem in found:
            loader.fail(unode, "rollout.checks.http.url", problem)
    for key in ("error_ratio", "latency_p99"):
        why = trafficspec.unmet(cfg.workers.app, cfg.metrics.listen) if getattr(r.checks, key) else None
        if why:
            loader.fail(node_at(rnode, "checks", key) or rnode, f"rollout.checks.{key}", why)
    for i, arg in enumerate(r.checks.command or ()):
        cnode = node_at(rnode, "checks", "command", i) or node_at(rnode, "checks", "command") or rnode
        try:
            names = placeholders.fields(arg)
        except placeholders.TemplateError as e:
            loader.fail(cnode, f"rollout.checks.command[{i}]", str(e))
            continue
        for bad in (n for n in names if n != "generation"):
            loader.fail(cnode, f"rollout.checks.command[{i}]", f"{{{bad}}}: the command runs once "
                        "per rollout, not per worker; only {generation} is set")


def unique_listeners(loader: Reporter, node: yaml.SequenceNode, key: str, listeners: list[ListenerSpec]) -> None:
    """Report a listener name or address that a list gives twice."""
    names: dict[str, int] = {}
    addrs: dict[tuple[str, int | None, str], int] = {}
    for i, spec in enumerate(listeners):
        item = node.value[i]
        if spec.name in names:
            loader.fail(item, f"{key}[{i}].name",
                        f"duplicate listener name {spec.name!r} (also {key}[{names[spec.name]}])")
        names.setdefault(spec.name, i)
        addr = (spec.path, 0, "unix") if spec.path else \
            (str(ipaddress.ip_address(spec.host)), spec.port, spec.protocol)
        if addr in addrs:
            loader.fail(item, f"{key}[{i}]",
                        f"duplicate address {spec.address} (also {key}[{addrs[addr]}])")
        addrs.setdefault(addr, i)
