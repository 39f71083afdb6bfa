"""Reload on file change (`reload.watch`): decide when a watched path really changed.

The OS side (system/inotify.py) only says "something happened in a watched
directory" and fingerprints paths. This module debounces and decides:

- Any event sets `deadline` to now + `reload.debounce`; later events push it
  back, so a burst of writes (an editor, a partial write, kubelet's swap of
  the `..data` symlink) is one check. The master's select timeout includes
  the deadline; nothing polls while inotify works.
- At the deadline every path is fingerprinted (the config by content hash,
  other paths by resolved target, mtime and size) and compared with the
  baseline. Only a real change triggers (reported as `WatchTriggered`), and
  it takes exactly the HUP path: `Reloads.queue()`, so the outcome is
  reported as for a HUP.
- A watched path that is missing is waited for (a delete, then a re-create):
  its going does not trigger, its coming back does. It never holds up a
  change of another path (a config edit while an optional file is absent,
  or a symlink loop among the watched paths, which fingerprints as missing).
- A config that does not parse is checked once more one debounce later (a
  writer still busy); if it is still the same invalid file, the reload runs
  and is rejected, logged with the error's location and counted, as on HUP.
- Every reload (whatever asked for it) rebases the fingerprints just before
  it reads the config, so an edit followed by `upgraderd reload` is one
  reload, not two.
- The watch list follows the config: a reload that changes `reload.watch`
  re-targets the watches once it succeeds.
"""

from __future__ import annotations

import logging
from typing import Callable

from upgraderd.config.schema import Config, ReloadSpec
from upgraderd.core import events as ev
from upgraderd.core.seams import WatcherAPI
from upgraderd.errors import ConfigError

log = logging.getLogger("upgraderd")

# How often the paths are re-checked when inotify is unavailable (at least the debounce).
POLL_INTERVAL = 2.0


class FileWatch:
    """The watched paths, their baseline fingerprints and the debounce deadline (owned by core/reloads.py)."""

    def __init__(self, seam: WatcherAPI | None, config_path: str, load_config: Callable[[str], Config],
                 bus: ev.Bus, queue: Callable[[float], None]) -> None:
        self.seam, self.config_path, self.load_config = seam, config_path, load_config
        self.bus, self.queue = bus, queue
        self.spec: ReloadSpec | None = None
        self.paths: tuple[str, ...] = ()
        self.watcher: WatcherAPI | None = None      # the seam, once a config is followed
        self.baseline: dict[str, str] = {}
        self.deadline: float | None = None
        self.held: str | None = None    # fingerprint of a config that did not parse at its first check
        self.absent: set[str] = set()   # watched paths missing at the last check

    def step(self, cfg: Config | None, stopping: bool, now: float) -> None:
        """Follow `cfg`'s watch list, read events, and check the paths once due."""
        self.follow(cfg, now)
        if self.watcher is None or self.spec is None or not self.paths or stopping:
            return
        if self.watcher.changed():
            self.deadline = now + self.spec.debounce
        if self.deadline is None or now < self.deadline:
            return
        self.deadline = None
        if self.watcher.fileno() is None:
            self.deadline = now + max(self.spec.debounce, POLL_INTERVAL)
        self.check(now)

    def follow(self, cfg: Config | None, now: float) -> None:
        """Re-target the watches when the serving config's `reload` section differs from ours."""
        watcher = self.seam
        if watcher is None or cfg is None or (cfg.reload == self.spec and self.watcher is not None):
            return
        self.spec, self.watcher = cfg.reload, watcher
        self.paths = tuple(self.config_path if p == "config" else p for p in cfg.reload.watch)
        self._watch()
        # Paths watched before keep their baseline: a change seen meanwhile is not lost.
        self.baseline = {p: self.baseline[p] if p in self.baseline else self._print(p) for p in self.paths}
        if watcher.fileno() is None:   # no inotify: check on a timer instead
            self.deadline = now + max(cfg.reload.debounce, POLL_INTERVAL)
        if self.paths:
            log.info("watching for changes (debounce %gs): %s", cfg.reload.debounce, ", ".join(self.paths))

    def rebase(self) -> None:
        """Take the current fingerprints as the baseline (a reload is about to read the config)."""
        if self.watcher is not None:
            self.baseline = {p: self._print(p) for p in self.paths}
            self.held = None

    def check(self, now: float) -> None:
        """Compare fingerprints with the baseline; queue a reload on a real change."""
        self._watch()   # a swapped symlink may now resolve into other directories
        prints = {p: self._print(p) for p in self.paths}
        missing = {p for p, fp in prints.items() if not fp}
        if missing - self.absent:
            log.info("watched path missing: %s; waiting for it to come back", ", ".join(sorted(missing - self.absent)))
        self.absent = missing
        # A missing path keeps its baseline: its going is no change, and back as it was is none either.
        changed = [p for p in self.paths if p not in missing and prints[p] != self.baseline.get(p)]
        if not changed:
            return
        if self._wait_for_parse(prints.get(self.config_path, ""), now):
            return
        self.baseline = {p: self.baseline.get(p, "") if p in missing else fp for p, fp in prints.items()}
        self.held = None
        self.bus.emit(ev.WatchTriggered(tuple(changed), self.config_path))
        self.queue(now)

    def _wait_for_parse(self, config_print: str, now: float) -> bool:
        """Return True (and re-arm) the first time a changed config does not parse."""
        try:
            self.load_config(self.config_path)
        except ConfigError as e:
            if config_print and config_print != self.held and self.spec is not None:
                self.held = config_print
                self.deadline = now + max(self.spec.debounce, 0.05)
                log.info("%s does not parse yet (%s); checking again in %gs", self.config_path,
                         str(e).splitlines()[0] if str(e) else "invalid", max(self.spec.debounce, 0.05))
                return True
        return False

    def _watch(self) -> None:
        assert self.watcher is not None
        for warning in self.watcher.watch(self.paths):
            log.warning("reload.watch: %s", warning)

    def _print(self, path: str) -> str:
        assert self.watcher is not None
        return self.watcher.fingerprint(path, content=path == self.config_path)
