"""Typed async client for one ``opencode serve`` process (one cell).

Built only from the server's base URL and its password (HTTP basic auth, user
``opencode``). No retries here: every error says whether it is transient, and the
workflow decides (R3). Facts about the server behind these calls: docs/opencode-api.md.
"""

from __future__ import annotations

import asyncio
import base64
import math
import re
import secrets
import shlex
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import httpx

from reactor.opencode.errors import (
    ModelError,
    OpenCodeAuthError,
    OpenCodeError,
    OpenCodeHTTPError,
    OpenCodeTimeout,
    OpenCodeUnavailable,
    TransientModelError,
)
from reactor.opencode.events import Event, read_events
from reactor.opencode.models import (
    AgentFailure,
    CommandResult,
    FileChange,
    Health,
    PromptResult,
    Session,
    TokenUsage,
    ToolCall,
    Usage,
)

__all__ = ["OpenCodeClient", "wrapper_script_path", "is_wrapped_command"]

WRAPPER_SCRIPT = "run_with_status.sh"
SHELL_AGENT = "build"
# Extra time the HTTP call to /shell waits beyond the command's own time limit (the
# wrapper kills the command at the limit, and KILLs it 5 s later).
SHELL_HTTP_GRACE = 30.0
DEFAULT_MAX_OUTPUT = 1_000_000
ABORT_TIMEOUT = 5.0
# The event stream heartbeats every 10 s; a stream silent for longer has stalled
# (opencode#28729: it can stall without closing).


def wrapper_script_path() -> str:
    """Absolute path of the shipped ``run_with_status.sh`` (package data)."""
    path = str(resources.files("reactor.opencode").joinpath(WRAPPER_SCRIPT))
    if "$" in path or "\n" in path:  # OpenCode substitutes $NAME in shell commands
        raise OpenCodeError(f"unusable path for {WRAPPER_SCRIPT}: {path!r}")
    return path


def is_wrapped_command(command: str) -> bool:
    """True for a command that :meth:`OpenCodeClient.run_command` sent (not the agent's):
    it shows up in the event stream as a bash tool call like the agent's own."""
    return WRAPPER_SCRIPT in command and wrapper_script_path() in command


class OpenCodeClient:
    """Async client of one OpenCode server. Use ``async with`` or call ``aclose()``."""

    def __init__(
        self,
        base_url: str,
        password: str,
        *,
        username: str = "opencode",
        request_timeout: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.request_timeout = request_timeout
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            auth=httpx.BasicAuth(username, password),
            timeout=httpx.Timeout(request_timeout),
            headers={"Accept": "application/json"},
        )

    def __repr__(self) -> str:
        return f"OpenCodeClient({self.base_url!r})"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "OpenCodeClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ transport

    def _timeout(self, read: float | None) -> httpx.Timeout:
        """A long read limit (``None``: no limit) with the usual connect/write limits."""
        short = self.request_timeout
        return httpx.Timeout(connect=short, read=read, write=short, pool=short)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        timeout: httpx.Timeout | None = None,
    ) -> Any:
        what = f"{method} {path}"
        try:
            response = await self._http.request(
                method, path, json=json, timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT
            )
        except httpx.TimeoutException as exc:
            if isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)):
                raise OpenCodeUnavailable(f"OpenCode server at {self.base_url} unreachable ({what}): {exc!r}") from None
            raise OpenCodeTimeout(f"OpenCode server at {self.base_url} did not answer {what} in time") from None
        except httpx.TransportError as exc:
            raise OpenCodeUnavailable(f"OpenCode server at {self.base_url} unavailable ({what}): {exc!r}") from None
        if response.status_code == 401:
            raise OpenCodeAuthError(f"OpenCode server at {self.base_url} rejected the credentials (HTTP 401, {what})")
        if response.status_code >= 400:
            raise OpenCodeHTTPError(
                response.status_code,
                f"OpenCode {what} -> HTTP {response.status_code}: {response.text[:500]}",
            )
        try:
            return response.json()
        except ValueError:
            raise OpenCodeHTTPError(
                response.status_code, f"OpenCode {what} -> not JSON: {response.text[:200]!r}"
            ) from None

    async def _abort_quietly(self, session_id: str) -> None:
        try:
            await self._request(
                "POST", f"/session/{session_id}/abort", timeout=httpx.Timeout(ABORT_TIMEOUT)
            )
        except OpenCodeError:
            pass

    async def _session_request(self, session_id: str, path: str, body: Any, read_timeout: float | None,
                               what: str) -> Any:
        """POST to a call that runs work in the session (a turn, a shell command). Closing the
        connection does not stop that work on the server, so when the read limit expires or
        the caller is cancelled, the session is aborted before the error propagates."""
        try:
            return await self._request(
                "POST", f"/session/{session_id}/{path}", json=body, timeout=self._timeout(read_timeout)
            )
        except OpenCodeTimeout:
            await self._abort_quietly(session_id)
            raise OpenCodeTimeout(
                f"{what} in session {session_id} did not finish within {read_timeout} s; aborted"
            ) from None
        except asyncio.CancelledError:
            await asyncio.shield(self._abort_quietly(session_id))
            raise

    # ----------------------------------------------------------------------- calls

    async def health(self) -> Health:
        """``GET /global/health`` -> ``{"healthy": true, "version": "1.18.33"}``."""
        return Health.model_validate(await self._request("GET", "/global/health"))

    async def create_session(self, title: str) -> Session:
        """``POST /session``. A session created with a title gets no title-generation
        request to the model."""
        return Session.model_validate(await self._request("POST", "/session", json={"title": title}))

    async def get_session(self, session_id: str) -> Session | None:
        """``GET /session/{id}``; None when the server does not know it (HTTP 404)."""
        try:
            return Session.model_validate(await self._request("GET", f"/session/{session_id}"))
        except OpenCodeHTTPError as exc:
            if exc.status == 404:
                return None
            raise

    async def prompt(
        self,
        session_id: str,
        text: str,
        *,
        model: str | None = None,
        agent: str | None = None,
        timeout: float | None = None,
    ) -> PromptResult:
        """Send a prompt and wait for the end of the agent's turn.

        ``model`` is ``"provider/model"``; ``timeout`` (seconds, ``None``: no limit)
        bounds the whole turn: when it expires the turn is aborted and
        :class:`OpenCodeTimeout` raised (also when the calling task is cancelled, the
        turn is aborted: a dropped request alone leaves it running on the server).
        While a turn runs, another prompt to the same session waits behind it. An aborted turn (see :meth:`abort`) returns
        a result whose ``error.aborted`` is true. A model error raises
        :class:`TransientModelError` (429/5xx/unreachable, after OpenCode's own five
        retries) or :class:`ModelError`.
        """
        body: dict[str, Any] = {"parts": [{"type": "text", "text": text}]}
        if model is not None:
            provider_id, sep, model_id = model.partition("/")
            if not sep or not provider_id or not model_id:
                raise ValueError(f"model must be 'provider/model', got {model!r}")
            body["model"] = {"providerID": provider_id, "modelID": model_id}
        if agent is not None:
            body["agent"] = agent
        data = await self._session_request(session_id, "message", body, timeout, "prompt")
        result = await self._turn_result(session_id, data)
        if result.error is not None and not result.error.aborted:
            failure = result.error
            detail = f"{failure.name}: {failure.message}"
            if failure.status_code is not None:
                detail += f" (HTTP {failure.status_code})"
            cls = TransientModelError if failure.transient else ModelError
            raise cls(f"model error in session {session_id}: {detail}", failure=failure, result=result)
        return result

    async def _turn_result(self, session_id: str, data: dict[str, Any]) -> PromptResult:
        """Sum a whole turn: OpenCode answers with the turn's *last* assistant message,
        while each model step is its own message (same ``parentID``)."""
        info = data.get("info") or {}
        parent = info.get("parentID")
        messages: list[dict[str, Any]] = []
        if parent:
            listed = await self._request("GET", f"/session/{session_id}/message")
            messages = [
                m
                for m in listed
                if (m.get("info") or {}).get("role") == "assistant" and (m.get("info") or {}).get("parentID") == parent
            ]
        if not any((m.get("info") or {}).get("id") == info.get("id") for m in messages):
            messages.append(data)

        tokens = TokenUsage()
        cost = 0.0
        tool_calls: list[ToolCall] = []
        for message in messages:
            minfo = message.get("info") or {}
            tokens = tokens + TokenUsage.from_opencode(minfo.get("tokens"))
            cost += float(minfo.get("cost") or 0.0)
            for part in message.get("parts") or []:
                if part.get("type") == "tool":
                    state = part.get("state") or {}
                    tool_calls.append(
                        ToolCall(
                            name=str(part.get("tool") or ""),
                            status=str(state.get("status") or ""),
                            call_id=str(part.get("callID") or ""),
                            error=state.get("error") if isinstance(state.get("error"), str) else None,
                        )
                    )
        last_text = [
            part.get("text", "")
            for part in data.get("parts") or []
            if part.get("type") == "text" and not part.get("synthetic") and not part.get("ignored")
        ]
        error = info.get("error")
        return PromptResult(
            session_id=session_id,
            message_id=str(info.get("id") or ""),
            text="\n".join(t for t in last_text if t),
            finish=info.get("finish"),
            tokens=tokens,
            cost=cost,
            error=AgentFailure.from_opencode(error) if isinstance(error, dict) else None,
            tool_calls=tool_calls,
            steps=len(messages),
        )

    async def run_command(
        self,
        session_id: str,
        command: str,
        *,
        timeout: float = 600.0,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> CommandResult:
        """Run a shell command in the worktree through the server (``POST
        /session/{id}/shell``, agent "build"), with its exit status.

        The command goes base64-encoded to the shipped wrapper script (no quoting or
        ``$`` substitution problems); ``timeout`` is enforced by the wrapper
        (``timed_out=True``, exit 124). Output is stdout+stderr, at most the last
        ``max_output`` bytes. Note: each call is recorded in the session's history and
        shown to the model on the next prompt; use a separate session for checks the
        agent should not see.
        """
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        nonce = secrets.token_hex(12)
        limit = max(1, math.ceil(timeout))
        encoded = base64.b64encode(command.encode()).decode("ascii")
        shell_command = (
            f"bash {shlex.quote(wrapper_script_path())} {nonce} {limit} {int(max_output)} {encoded}"
        )
        started = time.monotonic()
        data = await self._session_request(
            session_id, "shell", {"agent": SHELL_AGENT, "command": shell_command}, limit + SHELL_HTTP_GRACE, "command"
        )
        duration = time.monotonic() - started
        tool = next((p for p in data.get("parts") or [] if p.get("type") == "tool"), None)
        if tool is None:
            raise OpenCodeError(f"shell in session {session_id}: no tool part in the answer")
        state = tool.get("state") or {}
        output = state.get("output")
        if not isinstance(output, str):
            output = (state.get("metadata") or {}).get("output")
        if not isinstance(output, str):
            raise OpenCodeError(
                f"shell in session {session_id} ended with status {state.get('status')!r}: {state.get('error', '')}"
            )
        found = _find_sentinel(output, nonce)
        if found is None:
            raise OpenCodeError(
                f"shell in session {session_id}: no exit status in the output (status {state.get('status')!r})"
            )
        text, exit_code, timed_out, oom_kills = found
        return CommandResult(exit_code=exit_code, output=text, timed_out=timed_out, duration=duration,
                             oom_killed=oom_kills > 0 and exit_code == 137)

    async def changed_files(self) -> list[FileChange]:
        """The worktree's git status relative to HEAD (``GET /vcs/status``; untracked
        files are ``added``). ``GET /file/status`` is not used: it stays empty for
        files changed by tools in 1.18.33."""
        items = await self._request("GET", "/vcs/status")
        return [
            FileChange(
                path=str(item.get("file") or item.get("path") or ""),
                status=str(item.get("status") or ""),
                added=int(item.get("additions") or item.get("added") or 0),
                removed=int(item.get("deletions") or item.get("removed") or 0),
            )
            for item in items
        ]

    async def usage(self, session_id: str) -> Usage:
        """The session's aggregated tokens and cost (``GET /session/{id}``)."""
        data = await self._request("GET", f"/session/{session_id}")
        tokens = TokenUsage.from_opencode(data.get("tokens"))
        return Usage(**tokens.model_dump(), cost=float(data.get("cost") or 0.0))

    async def message_count(self, session_id: str) -> int:
        """How many messages the session holds (``GET /session/{id}/message``)."""
        listed = await self._request("GET", f"/session/{session_id}/message")
        return len(listed) if isinstance(listed, list) else 0

    async def busy(self, session_id: str) -> bool:
        """Whether the session's turn is still running (``GET /session/status``: the sessions
        that are not idle, with their state)."""
        data = await self._request("GET", "/session/status")
        state = (data or {}).get(session_id) if isinstance(data, dict) else None
        return isinstance(state, dict) and state.get("type") not in (None, "idle")

    def events(self, *, read_timeout: float = 30.0) -> AsyncIterator[Event]:
        """The server's event stream (``GET /event``, all sessions) as typed events, until
        the server closes it. Raises :class:`OpenCodeUnavailable` when nothing (not even a
        heartbeat, sent every 10 s) arrives for ``read_timeout`` seconds. For a background
        subscription with several consumers use :class:`reactor.opencode.events.EventFollower`."""
        return read_events(self._http, "/event", read_timeout)

    async def reject_permission(self, request_id: str, message: str) -> bool:
        """Refuse a pending permission request (``POST /permission/{id}/reply``, reply
        ``reject``). With a message the agent is told why and its turn goes on."""
        return bool(await self._request("POST", f"/permission/{request_id}/reply",
                                        json={"reply": "reject", "message": message}))

    async def pending_permissions(self) -> list[dict[str, Any]]:
        """Permission requests waiting for an answer (``GET /permission``), as the
        ``permission.asked`` event's properties."""
        return list(await self._request("GET", "/permission") or [])

    async def reject_question(self, request_id: str) -> bool:
        """Dismiss a question the agent asked its (absent) user (``POST /question/{id}/reject``)."""
        return bool(await self._request("POST", f"/question/{request_id}/reject"))

    async def abort(self, session_id: str) -> bool:
        """Stop the session's running turn (``POST /session/{id}/abort``). True also
        when nothing was running. The blocked :meth:`prompt` returns about 1 s later
        with ``result.aborted``."""
        return bool(await self._request("POST", f"/session/{session_id}/abort"))


def _find_sentinel(output: str, nonce: str) -> tuple[str, int, bool, int] | None:
    marker = f"\n@@reactor-exit {nonce} "
    index = output.rfind(marker)
    if index < 0:
        return None
    match = re.match(r"(-?\d+) ([01]) (-?\d+)", output[index + len(marker) :])
    if match is None:
        return None
    return output[:index], int(match.group(1)), match.group(2) == "1", int(match.group(3))
