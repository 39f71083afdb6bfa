"""Keys that take words read every word as written, YAML 1.1 booleans included.

YAML 1.1 (PyYAML) reads an unquoted off, on, yes or no as a boolean, so the
docs' own `drain.handoff: off` used to be rejected as `False`. The schema is
walked: every key whose check is a `one_of` gets each of its words, written
unquoted (and capitalized, as YAML also reads `Off`), and must load as that word.
"""

from __future__ import annotations

import dataclasses

import pytest

from upgraderd.config import schema
from upgraderd.config.validators import words
from upgraderd.errors import ConfigError

BASE = "listeners:\n  - {name: web, host: 127.0.0.1, port: 8080%s}\nworkers: {app: echo}\n"
YAML11_BOOLS = {"on", "off", "yes", "no", "y", "n", "true", "false"}


def enum_keys() -> list[tuple[str, str, str]]:
    """Return (section, key, word) for every word of every key that takes words."""
    out = []
    for section, cls in schema.SECTIONS.items():
        for f in dataclasses.fields(cls):
            for word in words(f.metadata.get("check")):  # type: ignore[arg-type]
                out.append((section, f.name, word))
    return out


def text_with(section: str, key: str, value: str) -> str:
    if section == "listeners":
        return BASE % f", {key}: {value}"
    base = BASE % ""
    if section == "workers":
        return base.replace("{app: echo}", f"{{app: echo, {key}: {value}}}")
    return base + f"{section}:\n  {key}: {value}\n"


def test_the_walk_finds_the_enum_keys() -> None:
    found = {(s, k) for s, k, _ in enum_keys()}
    assert {("drain", "handoff"), ("listeners", "mode"), ("log", "level"),
            ("kernel", "tcp_migrate_req"), ("ready", "mode")} <= found
    assert any(w in YAML11_BOOLS for _, _, w in enum_keys()), "no key takes a YAML 1.1 word"


@pytest.mark.parametrize("section,key,word", enum_keys())
def test_every_word_of_every_enum_key_loads_unquoted(section: str, key: str, word: str) -> None:
    for written in {word, word.capitalize()} if word in YAML11_BOOLS else {word}:
        text = text_with(section, key, written)
        try:
            cfg = schema.parse(text, "words.yaml")
        except ConfigError as e:
            # The word may need a companion (ready.mode: http needs ready.url, flows: cookie
            # protocol udp), but the word itself must be taken.
            path = f"{section}[0].{key}" if section == "listeners" else f"{section}.{key}"
            assert not [p for p in e.problems if f" {path}: " in p and "is not one of" in p], \
                (text, e.problems)
            continue
        part = getattr(cfg, section)
        got = getattr(part[0] if section == "listeners" else part, key)
        assert got == word, (text, got)


def test_drain_handoff_off_as_the_docs_write_it() -> None:
    cfg = schema.parse(BASE % "" + "drain:\n  handoff: off\n", "words.yaml")
    assert cfg.drain.handoff == "off"


def test_a_yaml_boolean_that_is_not_one_of_the_words_names_the_word() -> None:
    with pytest.raises(ConfigError) as e:
        schema.parse(BASE % "" + "drain:\n  handoff: no\n", "words.yaml")
    assert e.value.problems == ["words.yaml:5:12: drain.handoff: 'no' is not one of auto, off"]
