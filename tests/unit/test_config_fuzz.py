"""Property: the loader turns any text into a Config or a located ConfigError, nothing else."""

from __future__ import annotations

import os
import re

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import ROOT
from upgraderd.config import schema as config
from upgraderd.errors import ConfigError

PATH = "fuzz.yaml"
DEFAULT = (ROOT / "config" / "upgraderd.yaml").read_text()
LOCATED = re.compile(rf"^{re.escape(PATH)}:\d+:\d+: \S")
# The only problems that cannot point at a line: they are about the whole text.
WHOLE_FILE = (f"{PATH}: the file is empty; it needs at least `listeners:`",
              f"{PATH}: YAML syntax error: nested too deeply")

KEYS = sorted({f.name for cls in (config.Config, *config.SECTIONS.values())
               for f in config.dataclasses.fields(cls) if not f.metadata.get("internal")})
# FUZZ_EXAMPLES=5000 scripts/test tests/unit/test_config_fuzz.py searches harder.
SETTINGS = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-70000, 70000), st.floats(allow_nan=True),
    st.sampled_from(["echo", "http", "TERM", "SIGKILL", "10s", "500ms", "-1s", "2m", "reuseport",
                     "shared", "worker-bind", "127.0.0.1", "::1", "localhost", "nobody", "root",
                     "/bin/true", "no-such-program", "", "json", "text", "/nonexistent/x.log"]),
    st.text(max_size=12))
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=8))
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
    max_leaves=25)


def assert_loads_or_locates(text: str) -> None:
    try:
        cfg = config.parse(text, PATH)
    except ConfigError as e:
        assert e.problems
        for problem in e.problems:
            assert LOCATED.match(problem) or problem in WHOLE_FILE, problem
    else:
        assert isinstance(cfg, config.Config) and cfg.listeners


@SETTINGS
@given(documents)
def test_random_documents(doc: object) -> None:
    assert_loads_or_locates(yaml.safe_dump(doc))


@SETTINGS
@given(st.dictionaries(st.sampled_from(list(config.SECTIONS)), documents, min_size=1, max_size=6))
def test_random_sections(doc: dict[str, object]) -> None:
    assert_loads_or_locates(yaml.safe_dump(doc))


LINES = DEFAULT.splitlines(keepends=True)
mutation = st.one_of(
    st.tuples(st.just("delete"), st.integers(0, len(LINES) - 1)),
    st.tuples(st.just("duplicate"), st.integers(0, len(LINES) - 1)),
    st.tuples(st.just("char"), st.integers(0, len(DEFAULT) - 1), st.characters()),
    st.tuples(st.just("insert"), st.integers(0, len(DEFAULT)), st.text(max_size=6)),
    st.tuples(st.just("value"), st.integers(0, len(LINES) - 1), scalars),
)


def mutate(text: str, op: tuple[object, ...]) -> str:
    lines = text.splitlines(keepends=True)
    kind, at = op[0], int(op[1])  # type: ignore[call-overload]
    if kind in ("delete", "duplicate", "value"):
        at = min(at, len(lines) - 1)
    if kind == "delete":
        return "".join(lines[:at] + lines[at + 1:])
    if kind == "duplicate":
        return "".join(lines[:at + 1] + lines[at:])
    if kind == "value":
        key, sep, _ = lines[at].partition(":")
        if not sep:
            return text
        value = yaml.safe_dump(op[2], default_flow_style=True).splitlines()[0]
        lines[at] = f"{key}: {value}\n"
        return "".join(lines)
    at = min(at, len(text))
    if kind == "char":
        return text[:at] + str(op[2]) + text[at + 1:]
    return text[:at] + str(op[2]) + text[at:]


def test_default_config_is_valid() -> None:
    cfg = config.parse(DEFAULT, PATH)
    assert cfg.listeners[0].port == 8090 and cfg.workers.app == "echo"


@SETTINGS
@given(st.lists(mutation, min_size=1, max_size=4))
def test_mutations_of_the_default_config(ops: list[tuple[object, ...]]) -> None:
    text = DEFAULT
    for op in ops:
        text = mutate(text, op)
    assert_loads_or_locates(text)


@SETTINGS
@given(st.text(max_size=200))
def test_random_text(text: str) -> None:
    assert_loads_or_locates(text)
