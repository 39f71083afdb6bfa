"""Argv and URL placeholders: `{fd:web}`, `{addr:web}`, `{slot}`, ...

Many servers take their socket or address as a flag (`uvicorn --fd 3`,
`--bind 127.0.0.1:8000`) rather than reading LISTEN_FDS. A `command:` argv
element or `ready.url` may therefore name per-worker values in braces:

    {fd:NAME}     fd number of listener NAME in the worker (3, 4, ...)
    {addr:NAME}   host:port of listener NAME (IPv6 as [::1]:8000)
    {host:NAME}   host of listener NAME
    {port:NAME}   port of listener NAME
    {slot}        worker slot, 0 .. workers.count-1
    {generation}  generation number, 1, 2, ...
    {probe_port}  with ready.mode http: a port on 127.0.0.1 reserved for this
                  worker's health endpoint

`{{` and `}}` stand for literal braces. Every placeholder is checked when
the config is loaded (`problems()`), so a typo is a config error with its
location, never a worker started with a literal `{fd:wbe}` in its argv.

This module is pure: it parses and substitutes strings.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Mapping

from upgraderd.contract import env as contract
from upgraderd.contract.env import addr_env_name

if TYPE_CHECKING:
    from upgraderd.config.schema import Config

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
KNOWN = "{fd:NAME}, {addr:NAME}, {host:NAME}, {port:NAME}, {slot}, {generation}, {probe_port}"


class TemplateError(ValueError):
    """A template is malformed or names an unknown value."""


def fields(template: str) -> list[str]:
    """Return the placeholder names in `template` (e.g. ['fd:web', 'slot']); raise TemplateError."""
    out: list[str] = []
    for m in _TOKEN.finditer(template):
        tok = m.group(0)
        if tok in ("{{", "}}"):
            continue
        if m.group(1) is None:
            raise TemplateError(f"unmatched {tok!r} at character {m.start() + 1} of {template!r}; "
                                f"write '{tok}{tok}' for a literal brace")
        out.append(m.group(1))
    return out


def expand(template: str, values: Mapping[str, str]) -> str:
    """Substitute every placeholder of `template` from `values`; raise TemplateError."""
    def sub(m: re.Match[str]) -> str:
        tok = m.group(0)
        if tok in ("{{", "}}"):
            return tok[0]
        key = m.group(1)
        if key is None:
            raise TemplateError(f"unmatched {tok!r} in {template!r}")
        if key not in values:
            raise TemplateError(f"unknown placeholder {{{key}}}")
        return values[key]
    return _TOKEN.sub(sub, template)


def values(cfg: Config, slot: int, generation: int, probe_port: int | None = None) -> dict[str, str]:
    """Return every placeholder value for worker `slot` of generation `generation`."""
    out = {"slot": str(slot), "generation": str(generation)}
    if probe_port is not None:
        out["probe_port"] = str(probe_port)
    for spec in cfg.listeners:
        out[f"addr:{spec.name}"] = spec.address
        if spec.path is None:
            out[f"host:{spec.name}"] = spec.host
            out[f"port:{spec.name}"] = str(spec.port)
    for fd, spec in enumerate(cfg.fd_listeners, start=3):
        out[f"fd:{spec.name}"] = str(fd)
    return out


def problems(template: str, cfg: Config) -> list[str]:
    """Return what is wrong with the placeholders of `template` under `cfg` (empty if fine)."""
    try:
        names = fields(template)
    except TemplateError as e:
        return [str(e)]
    modes = {spec.name: spec.mode for spec in cfg.listeners}
    unix = {spec.name: spec.path for spec in cfg.listeners if spec.path is not None}
    concrete = list(values(cfg, 0, 1, 1 if cfg.ready.mode == "http" else None))
    out = []
    for key in names:
        kind, colon, arg = key.partition(":")
        if not colon and kind in ("slot", "generation"):
            continue
        if not colon and kind == "probe_port":
            if cfg.ready.mode != "http":
                out.append("{probe_port} is only set with ready.mode http")
            continue
        if colon and kind in ("fd", "addr", "host", "port"):
            if arg not in modes:
                out.append(f"{{{key}}} names no listener{_hint(key, concrete)}; "
                           f"listeners: {', '.join(modes)}")
            elif kind in ("host", "port") and arg in unix:
                out.append(f"{{{key}}}: listener {arg!r} is the Unix socket {unix[arg]}, which has "
                           f"no {kind}; use {{fd:{arg}}} or {{addr:{arg}}} (its path)")
            elif kind == "fd" and modes[arg] == "worker-bind":
                out.append(f"{{{key}}}: listener {arg!r} is worker-bind, so the master passes no fd "
                           f"for it; use {{addr:{arg}}} and bind it in the worker")
            continue
        out.append(f"unknown placeholder {{{key}}}{_hint(key, concrete)}; known: {KNOWN} "
                   f"(write {{{{ and }}}} for literal braces)")
    return out


def _hint(key: str, concrete: list[str]) -> str:
    import difflib   # here: only `check` needs it
    close = difflib.get_close_matches(key, concrete, n=1, cutoff=0.6)
    return f" (did you mean {{{close[0]}}}?)" if close else ""


def environment(cfg: Config, vals: Mapping[str, str]) -> dict[str, str]:
    """Return the UPGRADERD_ADDR_<NAME>, UPGRADERD_WORKER_BIND, UPGRADERD_PROBE_PORT, UPGRADERD_NAME (and UPGRADERD_HTTP) variables."""
    env = {addr_env_name(spec.name): spec.address for spec in cfg.listeners}
    env[contract.WORKER_BIND] = ":".join(s.name for s in cfg.listeners if s.mode == "worker-bind")
    if "probe_port" in vals:
        env[contract.PROBE_PORT] = vals["probe_port"]
    env[contract.LOG_FORMAT] = cfg.log.format   # built-in workers' own lines (apps/logline.py)
    if cfg.name is not None:
        env[contract.NAME] = cfg.name   # for process titles (worker/proctitle.py)
    if cfg.workers.app is not None and cfg.workers.app.partition(":")[0] in ("asgi", "wsgi"):
        # Imported here: only web apps need the http section's variable.
        from upgraderd.config.httpspec import environment as http_environment
        env.update(http_environment(cfg.http, cfg.drain.timeout,
                                    tuple(s.name for s in cfg.listeners if s.mode == "shared")))
    return env
