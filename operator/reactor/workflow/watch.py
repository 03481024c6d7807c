"""Watching an agent's turn through the cell's event stream (``GET /event``, followed once
per server by the cell's EventFollower; the watch is one consumer of its hub).

A cell is headless: nobody answers a permission prompt or a question, and a turn waiting
for one waits until the time box. So every ``permission.asked`` is refused the moment it
appears (with a message: the agent is told why and its turn goes on) and every
``question.asked`` is dismissed.

The stream also tells whether the agent is getting anywhere. Progress is a new message
part (text, reasoning, a tool call changing state, a file edit) or a step that used
tokens. A model answering with empty streams makes OpenCode loop through empty steps
(step-start, then step-finish with zero tokens, every ~0.3 s, at ~80 % CPU): those are not
progress. No progress for ``stall_timeout`` seconds ends the turn (AgentStalled).

The clock starts with the agent's first model step (its first ``step-start`` part) and
stands still while a tool runs (a build the agent started). Before the first step a cell's
first turn waits for OpenCode itself: it installs its provider and plugin packages into the
cell's config dir (measured: 2-3 s on an idle machine, 20-50 s on an overloaded one), which
is not the agent stalling. So a model that never answers its very first request, and a
tool that runs forever, are bounded by the task's time box (and the tool's own limit),
not by the stall timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from reactor.opencode.client import OpenCodeClient
from reactor.opencode.errors import OpenCodeError
from reactor.opencode.events import (
    Connected, Event, EventHub, FileEdited, OtherEvent, PartUpdated, SessionRetry, StepFinished, StepStarted,
    Streaming, TextDone, ToolUpdate,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

REFUSAL = ("Reactor runs this agent unattended and nobody can grant permissions: "
           "'{permission}' ({patterns}) is refused. Do the task without it.")
_CHECK_PENDING = object()  # answer whatever was asked while nobody listened


class AgentStalled(OpenCodeError):
    """The agent made no progress for the stall timeout; its turn was aborted."""


def is_progress(event: Event) -> bool:
    """Whether one event from the stream shows the agent moving (see the module doc)."""
    if isinstance(event, (Streaming, TextDone, ToolUpdate, FileEdited, PartUpdated, SessionRetry)):
        return True  # (a provider retry: OpenCode gives up by itself after a few tries)
    if isinstance(event, StepFinished):
        tokens = event.tokens
        return bool(tokens.input_tokens or tokens.output_tokens or tokens.reasoning_tokens)
    return False


class TurnWatch:
    def __init__(self, client: OpenCodeClient | None, stall_timeout: float, clock: Callable[[], float] = time.monotonic):
        self.client = client
        self.stall_timeout = stall_timeout
        self.clock = clock
        self.last_progress = clock()
        self.refused: list[str] = []  # permissions refused, e.g. "bash: rm -rf /"
        self.turn_started = False
        self._running_tools: set[str] = set()
        self._to_answer: asyncio.Queue | None = None

    # -- what one event means (a consumer of the cell's hub: no I/O here) --

    def observe(self, event: Event) -> None:
        first_step = not self.turn_started and isinstance(event, StepStarted)
        if first_step or (self.turn_started and is_progress(event)):  # (the prompt's own part comes first)
            self.turn_started = True
            self.last_progress = self.clock()
        if isinstance(event, ToolUpdate):
            if event.status in ("pending", "running"):
                self._running_tools.add(event.call_id)
            else:
                self._running_tools.discard(event.call_id)
        if self._to_answer is not None:
            if isinstance(event, Connected):  # (re)connected: a request may have come in the gap
                self._to_answer.put_nowait(_CHECK_PENDING)
            elif isinstance(event, OtherEvent) and event.type in ("permission.asked", "question.asked"):
                self._to_answer.put_nowait(event)

    def stalled_for(self) -> float:
        """Seconds without progress (0 before the turn starts and while a tool runs)."""
        if self._running_tools or not self.turn_started:
            self.last_progress = self.clock()
            return 0.0
        return self.clock() - self.last_progress

    # -- answering what nobody can answer --

    async def _answer(self, event: OtherEvent) -> None:
        assert self.client is not None
        props = event.properties
        if event.type == "permission.asked":
            what = f"{props.get('permission')}: {' '.join(props.get('patterns') or [])}".strip()
            self.refused.append(what)
            log.warning("refusing permission %s (nobody can answer it)", what)
            await self.client.reject_permission(
                str(props.get("id")),
                REFUSAL.format(permission=props.get("permission"), patterns=", ".join(props.get("patterns") or [])))
        elif event.type == "question.asked":
            log.warning("dismissing a question of the agent (nobody can answer it)")
            await self.client.reject_question(str(props.get("id")))

    async def _answer_all(self, queue: asyncio.Queue) -> None:
        assert self.client is not None
        while True:
            item = await queue.get()
            with contextlib.suppress(OpenCodeError):  # IG: the request may be gone already
                if item is _CHECK_PENDING:
                    for pending in await self.client.pending_permissions():
                        await self._answer(OtherEvent("permission.asked", pending))
                else:
                    await self._answer(item)

    async def run(self, hub: EventHub, turn: Callable[[], Awaitable[T]]) -> T:
        """Run ``turn()`` (a prompt) while watching ``hub``; AgentStalled when it makes no
        progress for the stall timeout (the turn is cancelled, which aborts it)."""
        queue: asyncio.Queue = asyncio.Queue()
        self._to_answer = queue
        queue.put_nowait(_CHECK_PENDING)  # asked before this turn's watch began
        unsubscribe = hub.subscribe(self.observe)
        answering = asyncio.create_task(self._answer_all(queue), name="turn-watch answers")
        try:
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
            unsubscribe()
            self._to_answer = None
            answering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await answering
