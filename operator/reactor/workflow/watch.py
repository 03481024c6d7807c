"""Watching an agent's turn through the server's event stream (``GET /event``).

A cell is headless: nobody answers a permission prompt or a question, and a turn waiting
for one waits until the time box. So every ``permission.asked`` is refused the moment it
appears (with a message: the agent is told why and its turn goes on) and every
``question.asked`` is dismissed.

The stream also tells whether the agent is getting anywhere. Progress is a new message
part (text, reasoning, a tool call changing state, a file edit) or a step that used
tokens. A model answering with empty streams makes OpenCode loop through empty steps
(step-start, then step-finish with zero tokens, every ~0.3 s, at ~80 % CPU): those are not
progress. No progress for ``stall_timeout`` seconds ends the turn (AgentStalled). The clock
starts when the turn does (the session's first ``busy`` status: a cell's first turn can
wait seconds for OpenCode to load its config), and stands still while a tool runs (a
build the agent started): the tool's own time limit and the task's time box bound those.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from reactor.opencode.client import OpenCodeClient
from reactor.opencode.errors import OpenCodeError

log = logging.getLogger(__name__)
T = TypeVar("T")

REFUSAL = ("Reactor runs this agent unattended and nobody can grant permissions: "
           "'{permission}' ({patterns}) is refused. Do the task without it.")
SUBSCRIBE_TIMEOUT = 5.0
RECONNECT_DELAY = 0.5


class AgentStalled(OpenCodeError):
    """The agent made no progress for the stall timeout; its turn was aborted."""


def is_progress(event: dict[str, Any]) -> bool:
    """Whether one event from the stream shows the agent moving (see the module doc)."""
    kind = event.get("type")
    props = event.get("properties") or {}
    if kind in ("message.part.delta", "file.edited"):
        return True
    if kind == "session.status":
        # OpenCode retrying the provider (429/5xx): it gives up by itself after a few tries.
        return (props.get("status") or {}).get("type") == "retry"
    if kind != "message.part.updated":
        return False
    part = props.get("part") or {}
    if part.get("type") == "step-start":
        return False
    if part.get("type") == "step-finish":
        tokens = part.get("tokens") or {}
        return any(tokens.get(key) for key in ("input", "output", "reasoning"))
    return True


class TurnWatch:
    def __init__(self, client: OpenCodeClient, stall_timeout: float, clock: Callable[[], float] = time.monotonic):
        self.client = client
        self.stall_timeout = stall_timeout
        self.clock = clock
        self.last_progress = clock()
        self.refused: list[str] = []  # permissions refused, e.g. "bash: rm -rf /"
        self.turn_started = False
        self._running_tools: set[str] = set()
        self._connected = asyncio.Event()

    # -- what one event means --

    def observe(self, event: dict[str, Any]) -> None:
        if is_progress(event) or (event.get("type") == "session.status" and not self.turn_started):
            self.turn_started = self.turn_started or event.get("type") == "session.status"
            self.last_progress = self.clock()
        part = (event.get("properties") or {}).get("part") or {}
        if event.get("type") == "message.part.updated" and part.get("type") == "tool":
            call = str(part.get("callID") or part.get("id") or "")
            if (part.get("state") or {}).get("status") in ("pending", "running"):
                self._running_tools.add(call)
            else:
                self._running_tools.discard(call)

    def stalled_for(self) -> float:
        """Seconds without progress (0 before the turn starts and while a tool runs)."""
        if self._running_tools or not self.turn_started:
            self.last_progress = self.clock()
            return 0.0
        return self.clock() - self.last_progress

    # -- following the stream --

    async def _answer(self, event: dict[str, Any]) -> None:
        props = event.get("properties") or {}
        if event.get("type") == "permission.asked":
            what = f"{props.get('permission')}: {' '.join(props.get('patterns') or [])}".strip()
            self.refused.append(what)
            log.warning("refusing permission %s (nobody can answer it)", what)
            await self.client.reject_permission(
                str(props.get("id")),
                REFUSAL.format(permission=props.get("permission"), patterns=", ".join(props.get("patterns") or [])))
        elif event.get("type") == "question.asked":
            log.warning("dismissing a question of the agent (nobody can answer it)")
            await self.client.reject_question(str(props.get("id")))

    async def follow(self) -> None:
        """Read the stream until cancelled, reconnecting when it drops."""
        while True:
            try:
                async for event in self.client.events():
                    if event.get("type") == "server.connected":
                        # Requests asked while we were not listening (before, or in a gap).
                        with contextlib.suppress(OpenCodeError):
                            for pending in await self.client.pending_permissions():
                                await self._answer({"type": "permission.asked", "properties": pending})
                        self._connected.set()
                    self.observe(event)
                    with contextlib.suppress(OpenCodeError):  # IG: the request may be gone already
                        await self._answer(event)
            except OpenCodeError as exc:
                log.debug("event stream: %s; reconnecting", exc)
            await asyncio.sleep(RECONNECT_DELAY)

    async def run(self, turn: Callable[[], Awaitable[T]]) -> T:
        """Run ``turn()`` (a prompt) while following the stream; AgentStalled when it makes
        no progress for the stall timeout (the turn is cancelled, which aborts it)."""
        follower = asyncio.create_task(self.follow(), name="turn-watch")
        try:
            with contextlib.suppress(TimeoutError):  # a late subscription only delays detection
                await asyncio.wait_for(self._connected.wait(), SUBSCRIBE_TIMEOUT)
            self.last_progress = self.clock()
            running = asyncio.create_task(turn(), name="turn")
            try:
                while True:
                    left = self.stall_timeout - self.stalled_for()
                    if left <= 0:
                        raise AgentStalled(f"the agent made no progress for {self.stall_timeout:g}s "
                                           "(no new message part, tool call or token); its turn was aborted")
                    done, _ = await asyncio.wait({running}, timeout=left)
                    if done:
                        return running.result()
            finally:
                if not running.done():
                    running.cancel()  # the client aborts the session's turn on cancellation
                    await asyncio.wait({running})
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
