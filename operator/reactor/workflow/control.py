"""Stopping a running task with a verdict, and the running spend that budgets check.

A :class:`TaskControl` goes with one task run. Whoever may stop the task (its own budget
guard, the operator's namespace spend limit, a stall detector) calls :meth:`TaskControl.stop`
with a reason; the workflow then aborts the agent, reverts the worktree and ends the task
with that reason, unless the task already reached Committing (a change that passed its
tests is not thrown away for money already spent).

The running spend is summed from the cell's event stream (one ``step-finish`` per model
step), so a budget is checked after every model step, while the turn is still going.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from reactor.opencode.events import Event, StepFinished
from reactor.opencode.models import TokenUsage, Usage
from reactor.workflow.types import Budget, Reason

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StopRequest:
    reason: Reason
    message: str


@dataclass
class Spend:
    """What a task has spent so far: every model step of every session of every server the
    task used (R3 retries and BOOT_RETRY restarts included)."""

    tokens: TokenUsage = field(default_factory=TokenUsage)
    cost: float = 0.0
    steps: int = 0

    @property
    def total_tokens(self) -> int:
        return self.tokens.total_tokens

    def add(self, step: StepFinished) -> None:
        self.tokens = self.tokens + step.tokens
        self.cost += step.cost
        self.steps += 1

    def describe(self) -> str:
        return f"${self.cost:.4f}, {self.total_tokens} tokens in {self.steps} model steps"


def budget_exceeded(budget: Budget, spend: Spend) -> str | None:
    """Why ``spend`` is past ``budget``, or None. Crossing means going past the limit."""
    over = []
    if budget.max_cost is not None and spend.cost > budget.max_cost + 1e-12:
        over.append(f"cost ${spend.cost:.4f} > maxCost ${budget.max_cost:g}")
    if budget.max_tokens is not None and spend.total_tokens > budget.max_tokens:
        over.append(f"{spend.total_tokens} tokens > maxTokens {budget.max_tokens}")
    if not over:
        return None
    return f"budget exceeded: {'; '.join(over)} (spent {spend.describe()})"


class TaskControl:
    """The stop switch and running spend of one task run."""

    def __init__(self, spent_before: Spend | None = None) -> None:
        self.budget = Budget()  # set by run_task from the task's spec
        self.spend = spent_before or Spend()  # the one running total of this task
        self.request: StopRequest | None = None
        self._task: asyncio.Task | None = None  # the run to cancel on a stop request
        self._cancelled = False

    # -- the budget guard: subscribed to the cell's events before any other consumer --

    def on_event(self, event: Event) -> None:
        if not isinstance(event, StepFinished):
            return
        self.spend.add(event)
        if self.request is None:
            why = budget_exceeded(self.budget, self.spend)
            if why is not None:
                self.stop(Reason.BUDGET_EXCEEDED, why)

    def catch_up(self, session: Usage) -> None:
        """A reattached cell ran while no operator watched its events: count what its
        session's own total (``session``, as the server sums it) holds beyond the running
        total, field by field, then check the budget. Exact for a task with one session; with
        earlier sessions (R3 retries) the running total already holds more, and the steps
        missed are undercounted, never counted twice."""
        seen = self.spend.tokens
        missed = TokenUsage(**{name: max(0, getattr(session, name) - getattr(seen, name))
                               for name in TokenUsage.model_fields})
        cost = max(0.0, session.cost - self.spend.cost)
        if not missed.total_tokens and not cost:
            return
        self.spend.tokens, self.spend.cost = seen + missed, self.spend.cost + cost
        why = budget_exceeded(self.budget, self.spend) if self.request is None else None
        if why is not None:
            self.stop(Reason.BUDGET_EXCEEDED, why)

    # -- stopping --

    def stop(self, reason: Reason, message: str) -> bool:
        """Ask the run to stop with ``reason``. The first request wins; False when the run
        can no longer be stopped (it is committing or done) or was already asked."""
        if self.request is not None:
            return False
        self.request = StopRequest(reason, message)
        log.warning("stop requested: %s: %s", reason.value, message)
        if self._task is not None and not self._cancelled:
            self._cancelled = True
            self._task.cancel(f"stop: {reason.value}")
            return True
        return self._task is not None

    def guard(self) -> StopScope:
        return StopScope(self)


class TaskStopped(Exception):
    def __init__(self, request: StopRequest):
        super().__init__(request.message)
        self.request = request


class StopScope:
    """``async with control.guard():`` turns a stop request into :class:`TaskStopped`
    raised inside the block (by cancelling the running coroutine, as ``asyncio.timeout``
    does). :meth:`close` ends the stoppable part (before committing)."""

    def __init__(self, control: TaskControl) -> None:
        self.control = control

    async def __aenter__(self) -> StopScope:
        control = self.control
        control._task = asyncio.current_task()
        if control.request is not None:  # asked before the run even started
            raise TaskStopped(control.request)
        return self

    async def close(self) -> None:
        """From here on stop requests are recorded but no longer interrupt the run. A
        request that came before still ends it, here, before anything irreversible."""
        self.control._task = None
        if self.control._cancelled:
            await asyncio.sleep(0)  # the pending cancellation is delivered at this await

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        control = self.control
        control._task = None
        if control._cancelled and exc_type is asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            if task.uncancel() == 0 and control.request is not None:
                raise TaskStopped(control.request) from None
        return False
