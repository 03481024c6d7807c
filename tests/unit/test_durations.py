"""Durations as users write them (CLI flags and spec fields share the grammar)."""

from __future__ import annotations

import re

import pytest

from reactor.durations import DURATION_PATTERN, parse_duration
from reactor.errors import ConfigurationError


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90.0), ("90s", 90.0), ("10m", 600.0), ("1h30m", 5400.0), ("500ms", 0.5), ("1.5h", 5400.0), (45, 45.0),
])
def test_parses(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "10 minutes", "m", "-5s", "0", "0s", ""])
def test_rejects_with_a_clear_message(text):
    with pytest.raises(ConfigurationError, match="duration"):
        parse_duration(text)


def test_the_crd_accepts_the_same_grammar():
    crd = open("crds/agenttask.yaml").read()
    assert DURATION_PATTERN.replace("\\", "\\\\") in crd
    assert re.fullmatch(DURATION_PATTERN, "1h30m") and not re.fullmatch(DURATION_PATTERN, "90")
