"""Reload on file change (`reload.watch`): decide when a watched path really changed.

The OS side (system/inotify.py) only says "something happened in a watched
directory" and fingerprints paths. This module debounces and decides:

- Any event sets `deadline` to now + `reload.debounce`; later events push it
  back, so a burst of writes (an editor, a partial write, kubelet's swap of
  the `..data` symlink) is one check. The master's select timeout includes
  the deadline; nothing polls while inotify works.
- At the deadline every path is fingerprinted (the config by content hash,
  other paths by resolved target, mtime and size) and compared with the
  baseline. Only a real change triggers, and it takes exactly the HUP path:
  `ReloadTracker.hup()`, so the outcome is reported as for a HUP.
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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from upgraderd.errors import ConfigError

if TYPE_CHECKING:
    from upgraderd.config.schema import ReloadSpec
    from upgraderd.core.master import Master
    from upgraderd.core.seams import WatcherAPI

log = logging.getLogger("upgraderd")

# How often the paths are re-checked when inotify is unavailable (at least the debounce).
POLL_INTERVAL = 2.0


@dataclass
class FileWatch:
    """The watched paths, their baseline fingerprints and the debounce deadline."""

    spec: ReloadSpec | None = None
    config_path: str = ""
    paths: tuple[str, ...] = ()
    watcher: WatcherAPI | None = None
    baseline: dict[str, str] = field(default_factory=dict)
    deadline: float | None = None
    held: str | None = None    # fingerprint of a config that did not parse at its first check
    absent: set[str] = field(default_factory=set)  # watched paths missing at the last check

    def step(self, master: Master, now: float) -> None:
        """Follow the config's watch list, read events, and check the paths once due."""
        self.follow(master, now)
        if self.watcher is None or self.spec is None or not self.paths or master.stopping:
            return
        if self.watcher.changed():
            self.deadline = now + self.spec.debounce
        if self.deadline is None or now < self.deadline:
            return
        self.deadline = None
        if self.watcher.fileno() is None:
            self.deadline = now + max(self.spec.debounce, POLL_INTERVAL)
        self.check(master, now)

    def follow(self, master: Master, now: float) -> None:
        """Re-target the watches when the serving config's `reload` section differs from ours."""
        watcher, cfg = master.system.watcher, master.config
        if watcher is None or cfg is None or (cfg.reload == self.spec and master.config_path == self.config_path):
            return
        self.spec, self.watcher, self.config_path = cfg.reload, watcher, master.config_path
        self.paths = tuple(master.config_path if p == "config" else p for p in cfg.reload.watch)
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

    def check(self, master: Master, now: float) -> None:
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
        if self._wait_for_parse(master, prints.get(self.config_path, ""), now):
            return
        self.baseline = {p: self.baseline.get(p, "") if p in missing else fp for p, fp in prints.items()}
        self.held = None
        master.stats.watch_triggers += 1
        log.info("watched path changed: %s; reloading %s", ", ".join(changed), self.config_path)
        master.reloads.hup(now)

    def _wait_for_parse(self, master: Master, config_print: str, now: float) -> bool:
        """Return True (and re-arm) the first time a changed config does not parse."""
        try:
            master.system.load_config(self.config_path)
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
