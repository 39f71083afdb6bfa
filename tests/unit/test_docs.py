"""docs/configuration.md is generated from the option declarations and must match them."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from tests.support import ROOT
from upgraderd.config import schema as config
from upgraderd.config import docgen

CHECKED_IN = ROOT / "docs" / "configuration.md"


def test_checked_in_reference_matches_the_code():
    assert CHECKED_IN.read_text() == docgen.render(), (
        "docs/configuration.md is out of date: run `upgraderd docs -o docs/configuration.md`")


def test_every_key_is_documented_with_type_default_and_description():
    text = docgen.render()
    for name, cls in [("", config.Config), *config.SECTIONS.items()]:
        prefix = f"{name}[]." if name == "listeners" else f"{name}." if name else ""
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            row = next(line for line in text.splitlines() if line.startswith(f"| `{prefix}{f.name}` |"))
            key, kind, default, doc = [c.strip() for c in row.strip("|").split(" | ")]
            assert kind and default and doc == f.metadata["doc"], row


def test_docs_command_prints_the_reference():
    r = subprocess.run([sys.executable, "-m", "upgraderd", "docs"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout == docgen.render()


def test_durations_are_written_as_the_config_writes_them():
    assert [docgen.format_duration(s) for s in (0.1, 1.0, 30.0, 120.0, 90.0)] == \
        ["100ms", "1s", "30s", "2m", "90s"]


def test_the_generated_reference_names_files_that_exist():
    import re
    named = re.findall(r"upgraderd/[\w/]+\.py", docgen.render())
    assert named and [p for p in named if not (ROOT / p).is_file()] == []
