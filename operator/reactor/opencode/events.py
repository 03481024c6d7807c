"""OpenCode's event stream (``GET /event``, server-sent events) as typed events.

One :class:`EventFollower` per server reads the stream in the background and hands every
event to an :class:`EventHub`, which fans it out to any number of consumers (live
progress, the budget guard, the transcript, metrics, a stall detector). The hub outlives
the server: a cell keeps its hub, and each server it starts gets a follower feeding it.

What the stream carries (measured on 1.18.33, see docs/opencode-api.md): every session of
the server's directory. A model step is ``message.part.updated`` parts of type
``step-start``, ``tool`` (pending -> running -> completed/error, re-sent on each change),
``text`` and ``step-finish``; the step-finish part carries that step's tokens and cost,
which makes running totals possible before the turn ends. (The ``session.next.*`` events of
the OpenAPI document are not sent on this stream.) The server sends ``server.heartbeat``
every 10 s; the stream can stall without closing (opencode#28729), so reads time out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from reactor.opencode.errors import OpenCodeAuthError, OpenCodeError, OpenCodeHTTPError, OpenCodeUnavailable
from reactor.opencode.models import TokenUsage

if TYPE_CHECKING:
    from reactor.opencode.client import OpenCodeClient

log = logging.getLogger(__name__)

__all__ = [
    "Event", "Connected", "Heartbeat", "SessionBusy", "SessionIdle", "SessionRetry", "SessionError",
    "MessageInfo", "StepStarted", "StepFinished", "ToolUpdate", "TextDone", "Streaming", "PartUpdated",
    "FileEdited", "OtherEvent",
    "EventDecoder", "EventHub", "EventFollower", "Consumer",
]

HEARTBEAT_TIMEOUT = 30.0  # three missed heartbeats: the stream has stalled


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Event:
    """Base class. ``at`` is our monotonic clock when the event arrived."""

    at: float = field(default_factory=time.monotonic, kw_only=True)

    @property
    def agent_activity(self) -> bool:
        """True for events that show the agent doing something (not stream keep-alives)."""
        return True


@dataclass(frozen=True)
class Connected(Event):
    """``server.connected``: the subscription is live; later events will be seen."""

    @property
    def agent_activity(self) -> bool:
        return False


@dataclass(frozen=True)
class Heartbeat(Event):
    """``server.heartbeat`` (every 10 s)."""

    @property
    def agent_activity(self) -> bool:
        return False


@dataclass(frozen=True)
class SessionBusy(Event):
    session_id: str


@dataclass(frozen=True)
class SessionIdle(Event):
    """The session's turn is over (``session.idle``)."""

    session_id: str


@dataclass(frozen=True)
class SessionRetry(Event):
    """OpenCode is retrying a failed model call itself (``session.status`` type retry)."""

    session_id: str
    attempt: int
    message: str


@dataclass(frozen=True)
class SessionError(Event):
    session_id: str
    name: str
    message: str


@dataclass(frozen=True)
class MessageInfo(Event):
    """``message.updated``: a message was created or changed (role, model)."""

    session_id: str
    message_id: str
    role: str
    model: str = ""  # provider/model of an assistant message


@dataclass(frozen=True)
class StepStarted(Event):
    """A model step began (a ``step-start`` part)."""

    session_id: str
    message_id: str


@dataclass(frozen=True)
class StepFinished(Event):
    """A model step ended, with what it cost (a ``step-finish`` part). Sent once per step."""

    session_id: str
    message_id: str
    part_id: str
    reason: str  # "tool-calls", "stop", ...
    tokens: TokenUsage
    cost: float
    model: str = ""  # provider/model, when the step's message was seen


@dataclass(frozen=True)
class ToolUpdate(Event):
    """A tool call changed state: pending -> running -> completed | error."""

    session_id: str
    message_id: str
    call_id: str
    tool: str
    status: str
    input: dict[str, Any]
    output: str | None = None
    error: str | None = None
    title: str = ""


@dataclass(frozen=True)
class TextDone(Event):
    """A finished text part: the user's prompt (``role == "user"``) or the agent's answer."""

    session_id: str
    message_id: str
    role: str
    text: str
    synthetic: bool = False


@dataclass(frozen=True)
class Streaming(Event):
    """The model is streaming text into a part (``message.part.delta``, or a text part not
    finished yet): the agent is working; the finished part follows as :class:`TextDone`."""

    session_id: str


@dataclass(frozen=True)
class PartUpdated(Event):
    """A part of another kind appeared (reasoning, patch, file, subtask, ...): activity."""

    session_id: str
    message_id: str
    kind: str


@dataclass(frozen=True)
class FileEdited(Event):
    """The agent's edit or write tool changed a file (absolute path)."""

    file: str


@dataclass(frozen=True)
class OtherEvent(Event):
    """Anything else (kept for consumers that want raw events)."""

    type: str
    properties: dict[str, Any]

    @property
    def agent_activity(self) -> bool:
        return False


# ---------------------------------------------------------------------------- decoding


class EventDecoder:
    """Turns the stream's JSON objects into typed events. Stateful per stream: it remembers
    message roles and models (parts do not carry them) and which parts it has already
    reported (OpenCode re-sends a part on every change)."""

    MAX_REMEMBERED = 10_000

    def __init__(self) -> None:
        self._messages: dict[str, tuple[str, str]] = {}  # message id -> (role, provider/model)
        self._seen: dict[tuple[str, str], None] = {}  # (part id, state) already reported

    def _once(self, part_id: str, state: str) -> bool:
        key = (part_id, state)
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > self.MAX_REMEMBERED:  # bounded: forget the oldest half
            for old in list(self._seen)[: self.MAX_REMEMBERED // 2]:
                del self._seen[old]
        return True

    def decode(self, data: dict[str, Any]) -> Event | None:
        kind = str(data.get("type") or "")
        props = data.get("properties") or {}
        if not isinstance(props, dict):
            props = {}
        if kind == "server.connected":
            return Connected()
        if kind == "server.heartbeat":
            return Heartbeat()
        if kind == "session.status":
            status = props.get("status") or {}
            session = str(props.get("sessionID") or "")
            if status.get("type") == "busy":
                return SessionBusy(session)
            if status.get("type") == "retry":
                return SessionRetry(session, int(status.get("attempt") or 0), str(status.get("message") or ""))
            return None  # "idle" comes again as session.idle
        if kind == "session.idle":
            return SessionIdle(str(props.get("sessionID") or ""))
        if kind == "session.error":
            error = props.get("error") or {}
            return SessionError(str(props.get("sessionID") or ""), str(error.get("name") or "UnknownError"),
                                str((error.get("data") or {}).get("message") or ""))
        if kind == "file.edited":
            return FileEdited(str(props.get("file") or ""))
        if kind == "message.updated":
            info = props.get("info") or {}
            message_id, role = str(info.get("id") or ""), str(info.get("role") or "")
            model = ""
            if info.get("providerID") and info.get("modelID"):
                model = f"{info['providerID']}/{info['modelID']}"
            elif isinstance(info.get("model"), dict) and info["model"].get("providerID"):
                model = f"{info['model']['providerID']}/{info['model'].get('modelID', '')}"
            known = self._messages.get(message_id)
            self._messages[message_id] = (role, model or (known[1] if known else ""))
            if len(self._messages) > self.MAX_REMEMBERED:
                for old in list(self._messages)[: self.MAX_REMEMBERED // 2]:
                    del self._messages[old]
            if known is not None:
                return None  # only the first sighting is news
            return MessageInfo(str(props.get("sessionID") or info.get("sessionID") or ""), message_id, role, model)
        if kind == "message.part.updated":
            return self._part(props.get("part") or {})
        if kind == "message.part.delta":
            return Streaming(str(props.get("sessionID") or ""))
        return OtherEvent(kind, props)

    def _part(self, part: dict[str, Any]) -> Event | None:
        kind = part.get("type")
        part_id = str(part.get("id") or "")
        session, message = str(part.get("sessionID") or ""), str(part.get("messageID") or "")
        role, model = self._messages.get(message, ("", ""))
        if kind == "step-start":
            return StepStarted(session, message) if self._once(part_id, "start") else None
        if kind == "step-finish":
            if not self._once(part_id, "finish"):
                return None
            return StepFinished(session, message, part_id, str(part.get("reason") or ""),
                                TokenUsage.from_opencode(part.get("tokens")), float(part.get("cost") or 0.0), model)
        if kind == "tool":
            state = part.get("state") or {}
            status = str(state.get("status") or "")
            if not self._once(part_id, status):
                return None
            output = state.get("output")
            return ToolUpdate(
                session, message, str(part.get("callID") or ""), str(part.get("tool") or ""), status,
                state.get("input") if isinstance(state.get("input"), dict) else {},
                output if isinstance(output, str) else None,
                state.get("error") if isinstance(state.get("error"), str) else None,
                str(state.get("title") or ""),
            )
        if kind == "text":
            finished = bool((part.get("time") or {}).get("end")) or role == "user" or part.get("synthetic")
            if not finished:
                return Streaming(session)
            if not self._once(part_id, "done"):
                return None
            return TextDone(session, message, role or "assistant", str(part.get("text") or ""),
                            bool(part.get("synthetic")))
        if kind and self._once(part_id, str(kind)):
            return PartUpdated(session, message, str(kind))
        return None


# ------------------------------------------------------------------------------ fan-out

Consumer = Callable[[Event], None]


class EventHub:
    """Hands each event to every consumer, in subscription order. Consumers are plain
    functions (cheap, no I/O: whoever needs to write somewhere does it on its own
    schedule). A consumer that raises is logged and kept."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._consumers: list[Consumer] = []
        self.last_event_at: float | None = None  # any event, keep-alives included
        self.last_activity_at: float | None = None  # the agent did something

    def subscribe(self, consumer: Consumer) -> Callable[[], None]:
        """Add a consumer; returns the function that removes it."""
        self._consumers.append(consumer)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._consumers.remove(consumer)

        return unsubscribe

    def publish(self, event: Event) -> None:
        self.last_event_at = event.at
        if event.agent_activity:
            self.last_activity_at = event.at
        for consumer in list(self._consumers):
            try:
                consumer(event)
            except Exception:  # noqa: BLE001 - one broken consumer must not starve the others
                log.exception("%s: event consumer %r failed on %s", self.name, consumer, type(event).__name__)


class EventFollower:
    """Follows one server's ``GET /event`` in a background task, publishing to ``hub``.

    :meth:`start` returns once the server confirmed the subscription (``server.connected``),
    so events of a prompt sent afterwards are not missed. A dropped or stalled stream is
    reopened (events in the gap are lost; totals from ``GET /session/{id}`` stay exact)."""

    def __init__(self, client: OpenCodeClient, hub: EventHub, *, heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
                 reconnect_delay: float = 0.5) -> None:
        self.client, self.hub = client, hub
        self.heartbeat_timeout = heartbeat_timeout
        self.reconnect_delay = reconnect_delay
        self.reconnects = 0
        self._task: asyncio.Task | None = None
        self._connected = asyncio.Event()

    async def start(self, timeout: float = 10.0) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"opencode-events {self.client.base_url}")
        waiter = asyncio.ensure_future(self._connected.wait())
        done, _ = await asyncio.wait({waiter, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if self._task in done:
            self._task.result()  # raises what ended it
        if not self._connected.is_set():
            await self.stop()
            raise OpenCodeUnavailable(f"no event stream from {self.client.base_url} within {timeout} s")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _run(self) -> None:
        while True:
            try:
                async for event in self.client.events(read_timeout=self.heartbeat_timeout):
                    if isinstance(event, Connected):
                        self._connected.set()
                    self.hub.publish(event)
                reason = "closed"
            except OpenCodeAuthError:
                raise
            except OpenCodeError as exc:
                if not self._connected.is_set():
                    raise
                reason = str(exc)
            self.reconnects += 1
            log.debug("%s: event stream %s; reopening", self.client.base_url, reason)
            await asyncio.sleep(self.reconnect_delay * min(self.reconnects, 10))


async def read_events(http: httpx.AsyncClient, path: str, read_timeout: float) -> AsyncIterator[Event]:
    """The server-sent events of ``path`` as typed events (used by the client)."""
    decoder = EventDecoder()
    timeout = httpx.Timeout(connect=10.0, read=read_timeout, write=10.0, pool=10.0)
    try:
        async with http.stream("GET", path, timeout=timeout, headers={"Accept": "text/event-stream"}) as response:
            if response.status_code == 401:
                raise OpenCodeAuthError(f"OpenCode server rejected the credentials (HTTP 401, GET {path})")
            if response.status_code >= 400:
                await response.aread()
                raise OpenCodeHTTPError(response.status_code,
                                        f"OpenCode GET {path} -> HTTP {response.status_code}: {response.text[:200]}")
            data: list[str] = []
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    data.append(line[5:].lstrip(" "))
                elif not line and data:  # a blank line ends one server-sent event
                    raw, data = "\n".join(data), []
                    try:
                        parsed = json.loads(raw)
                    except ValueError:
                        log.debug("unparsable event: %.200r", raw)
                        continue
                    if isinstance(parsed, dict):
                        event = decoder.decode(parsed)
                        if event is not None:
                            yield event
    except httpx.ReadTimeout:
        raise OpenCodeUnavailable(f"event stream {path}: nothing received in {read_timeout} s (stalled)") from None
    except httpx.TransportError as exc:
        raise OpenCodeUnavailable(f"event stream {path}: {exc!r}") from None
