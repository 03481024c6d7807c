"""Durations as users write them: 90, 90s, 10m, 1h30m."""

from __future__ import annotations

import re

from reactor.errors import ConfigurationError

# The same grammar the CRD's pattern accepts.
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | float | int) -> float:
    """Seconds from '30m', '1h30m', '45s', '500ms' or a bare number of seconds."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        text = text.strip()
        try:
            seconds = float(text)
        except ValueError:
            if not re.fullmatch(DURATION_PATTERN, text):
                raise ConfigurationError(f"{text!r} is not a duration (examples: 90s, 10m, 1h30m)") from None
            seconds = sum(float(n) * _UNITS[u] for n, _, u in re.findall(r"([0-9]+(\.[0-9]+)?)(ms|s|m|h)", text))
    if seconds <= 0:
        raise ConfigurationError(f"duration {text!r} must be positive")
    return seconds
