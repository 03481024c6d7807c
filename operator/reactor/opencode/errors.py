"""Errors raised by the OpenCode client.

The client never retries: each error says whether trying again can help, and the
workflow owns the retry policy. Messages never contain the server password.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reactor.errors import ReactorError

if TYPE_CHECKING:
    from reactor.opencode.models import AgentFailure, PromptResult


class OpenCodeError(ReactorError):
    """Base class of everything the OpenCode client raises."""

    transient: bool = False


class OpenCodeUnavailable(OpenCodeError):
    """The server cannot be reached or went away mid-request (connection refused or
    reset, read error). Transient: the caller may restart the server and retry."""

    transient = True


class OpenCodeTimeout(OpenCodeUnavailable):
    """The server did not answer within the caller's time limit. The client has already
    asked the server to abort the session's running turn (best effort)."""


class OpenCodeHTTPError(OpenCodeError):
    """The server answered with an unexpected HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.transient = status == 429 or status >= 500


class OpenCodeAuthError(OpenCodeHTTPError):
    """401: the password (OPENCODE_SERVER_PASSWORD of that server) is wrong."""

    def __init__(self, message: str = "OpenCode server rejected the credentials (HTTP 401)") -> None:
        super().__init__(401, message)


class ModelError(OpenCodeError):
    """The turn ended with an error from the model provider (or OpenCode's model layer).

    ``failure`` is the error OpenCode recorded; ``result`` is the partial turn (tokens,
    tool calls made before the error)."""

    def __init__(self, message: str, *, failure: "AgentFailure", result: "PromptResult | None" = None) -> None:
        super().__init__(message)
        self.failure = failure
        self.result = result


class TransientModelError(ModelError):
    """A model error worth retrying later: HTTP 429/5xx, overloaded, model unreachable.
    OpenCode has already retried it internally (5 retries with backoff) before
    reporting it."""

    transient = True
