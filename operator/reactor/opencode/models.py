"""Pydantic models for the parts of the OpenCode server API that Reactor uses.

Tolerant by design (``extra="ignore"``): only the fields we read are declared, so
additions in newer OpenCode versions do not break parsing.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


def _int(value: Any) -> int:
    try:
        return int(round(float(value)))
    except (TypeError, ValueError):
        return 0


class Health(_Model):
    healthy: bool
    version: str


class Session(_Model):
    id: str
    title: str = ""
    directory: str = ""
    slug: str = ""


class TokenUsage(_Model):
    input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return (
            self.input_tokens
            + self.output_tokens
            + self.reasoning_tokens
            + self.cache_read_tokens
            + self.cache_write_tokens
        )

    @classmethod
    def from_opencode(cls, tokens: dict[str, Any] | None) -> "TokenUsage":
        """From OpenCode's ``{"input", "output", "reasoning", "cache": {"read", "write"}}``."""
        tokens = tokens or {}
        cache = tokens.get("cache") or {}
        return cls(
            input_tokens=_int(tokens.get("input")),
            output_tokens=_int(tokens.get("output")),
            reasoning_tokens=_int(tokens.get("reasoning")),
            cache_read_tokens=_int(cache.get("read")),
            cache_write_tokens=_int(cache.get("write")),
        )

    def __add__(self, other: "TokenUsage") -> "TokenUsage":
        return TokenUsage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
            cache_read_tokens=self.cache_read_tokens + other.cache_read_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
        )


class Usage(TokenUsage):
    """A session's aggregated usage (``GET /session/{id}``)."""

    cost: float = 0.0


class AgentFailure(_Model):
    """The error OpenCode recorded on an assistant message (``info.error``).

    ``name`` is OpenCode's error class: ``APIError`` (the provider answered an error
    status or could not be reached), ``ProviderAuthError``, ``UnknownError``,
    ``MessageOutputLengthError``, ``MessageAbortedError``, ``ContextOverflowError``,
    ``ContentFilterError``, ``StructuredOutputError``."""

    name: str
    message: str = ""
    status_code: int | None = None
    retryable: bool | None = None

    @property
    def aborted(self) -> bool:
        return self.name == "MessageAbortedError"

    @property
    def transient(self) -> bool:
        """Worth retrying later: 429/5xx, overloaded, or OpenCode says retryable."""
        if self.status_code is not None and (self.status_code == 429 or self.status_code >= 500):
            return True
        if self.name == "APIError" and self.retryable:
            return True
        lowered = self.message.lower()
        return any(word in lowered for word in ("overloaded", "rate limit", "too many requests"))

    @classmethod
    def from_opencode(cls, error: dict[str, Any]) -> "AgentFailure":
        data = error.get("data") or {}
        status = data.get("statusCode")
        retryable = data.get("isRetryable")
        return cls(
            name=str(error.get("name") or "UnknownError"),
            message=str(data.get("message") or ""),
            status_code=status if isinstance(status, int) else None,
            retryable=retryable if isinstance(retryable, bool) else None,
        )


class ToolCall(_Model):
    """One tool the agent called during the turn."""

    name: str
    status: Literal["pending", "running", "completed", "error"] | str
    call_id: str = ""
    error: str | None = None


class PromptResult(_Model):
    """One agent turn: everything from the prompt to the end of the turn.

    OpenCode stores a turn as several assistant messages (one per model step); tokens,
    cost and tool calls are summed over all of them, ``text``/``finish`` come from the
    last one. ``error`` is set only when the turn was aborted (other errors raise)."""

    session_id: str
    message_id: str
    text: str = ""
    finish: str | None = None
    tokens: TokenUsage = TokenUsage()
    cost: float = 0.0
    error: AgentFailure | None = None
    tool_calls: list[ToolCall] = []
    steps: int = 0

    @property
    def aborted(self) -> bool:
        return self.error is not None and self.error.aborted


class CommandResult(_Model):
    exit_code: int
    output: str
    timed_out: bool = False
    duration: float = 0.0
    # Killed (exit 137) while the kernel's OOM killer ended processes in its memory cgroup.
    oom_killed: bool = False


class FileChange(_Model):
    """A changed path in the worktree relative to HEAD (git status, untracked included)."""

    path: str
    status: Literal["added", "deleted", "modified"] | str
    added: int = 0
    removed: int = 0
