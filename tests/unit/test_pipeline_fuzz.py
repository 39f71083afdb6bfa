"""Property: check and the master agree on every config, and the master never raises.

A small sample runs here (FUZZ_EXAMPLES, 200 by default); bench/fuzz_pipeline.py
runs >= 10,000 accepted configs. See pipeline.py for what is generated and asserted.
"""

from __future__ import annotations

import logging
from typing import Iterator
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from tests.unit.pipeline import Tally, run_sequence, sequences

SETTINGS = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TALLY = Tally()


@pytest.fixture(autouse=True)
def quiet(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)  # keep notify_systemd() a no-op
    logger = logging.getLogger("upgraderd")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)   # later tests read the master's warnings with caplog


@SETTINGS
@given(sequences())
def check_and_master_agree(texts: list[str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        run_sequence(Path(d), texts, TALLY)


def test_check_and_master_agree_on_a_sample_that_exercises_both_sides() -> None:
    check_and_master_agree()
    # A generator that only made rejected configs would pass the property while testing nothing.
    assert TALLY.accepted >= 20 and TALLY.rejected >= 20, TALLY
    assert TALLY.outcomes.get("success", 0) >= 5, TALLY
