"""Keeping secrets out of everything we show: progress, transcripts, the web page."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

MASK = "***"
MIN_SECRET_LENGTH = 4  # shorter values would mask ordinary words


class Redactor:
    """Replaces every occurrence of a task's secret values (its Secrets' values, handed to
    the cell's environment) with ``***``. Values are matched verbatim; an agent that
    transforms a secret (base64, reversed) defeats it, so a secret's owner still must treat
    what a cell prints as sensitive."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret that contains another is masked whole.
        values = {value for value in secrets if value and len(value) >= MIN_SECRET_LENGTH}
        for value in list(values):  # multi-line secrets (keys) also leak line by line
            values.update(line for line in value.splitlines() if len(line.strip()) >= 8)
        self._values = sorted(values, key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self._values)

    def text(self, value: str) -> str:
        for secret in self._values:
            if secret in value:
                value = value.replace(secret, MASK)
        return value

    def data(self, value: Any) -> Any:
        """Redact every string inside JSON-like data."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(str(k)): self.data(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.data(v) for v in value]
        return value


def shorten(value: str, limit: int) -> str:
    """At most ``limit`` characters, with a note of how much was cut."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}… [{len(value) - limit} more chars]"
