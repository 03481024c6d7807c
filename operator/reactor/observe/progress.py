"""Live progress of one task, from its cell's OpenCode events and its phase changes.

What the agent is doing now (which tool on which file, "running tests"), how many model
steps and tool calls so far, the files it touched, tokens and cost so far (read from the
task's TaskControl: the budget guard owns the running total), the time of its last
activity. Milestones (first edit, budget nearly used, OpenCode retrying the model) are
reported once each to a callback, for Events.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from reactor.opencode.client import is_wrapped_command
from reactor.opencode.events import Event, FileEdited, SessionBusy, SessionRetry, StepFinished, StepStarted, ToolUpdate
from reactor.redact import Redactor, shorten
from reactor.workflow.control import TaskControl
from reactor.workflow.types import Phase, PhaseEvent

MAX_FILES = 20  # files listed in status; the count goes on
ACTIVITY_CHARS = 120
BUDGET_WARNING = 0.8  # share of a budget limit that raises a BudgetWarning milestone


@dataclass(frozen=True)
class Milestone:
    reason: str
    message: str
    warning: bool = False


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _describe_tool(tool: str, args: dict[str, Any], root: str | None) -> str:
    path = args.get("filePath") or args.get("path")
    if isinstance(path, str) and path:
        return f"{tool} {_relative(path, root)}"
    command = args.get("command")
    if isinstance(command, str) and command:
        return f"{tool}: {' '.join(command.split())}"
    pattern = args.get("pattern")
    if isinstance(pattern, str) and pattern:
        return f"{tool} {pattern}"
    return tool


def _relative(path: str, root: str | None) -> str:
    if root and os.path.isabs(path):
        try:
            relative = os.path.relpath(path, root)
        except ValueError:
            return path
        if not relative.startswith(".."):
            return relative
    return path


class ProgressTracker:
    """Consumer of a cell's events (``on_event``) and of phase changes (``on_phase``).
    ``version`` grows with every visible change, so a publisher can tell whether there is
    something new to write."""

    def __init__(self, control: TaskControl, redactor: Redactor | None = None,
                 on_milestone: Callable[[Milestone], None] | None = None) -> None:
        self.control = control
        self.redactor = redactor or Redactor()
        self.on_milestone = on_milestone
        self.version = 0
        self.phase: Phase | None = None
        self.activity = ""
        self.tool: str | None = None
        self.turns = 0
        self.tool_calls = 0
        self.files: list[str] = []
        self.model = ""
        self.last_activity: str | None = None
        self.last_activity_monotonic: float | None = None
        self._root: str | None = None
        self._running: dict[str, str] = {}  # call id -> description, tools still running
        self._milestones: set[str] = set()

    # -- inputs --

    def on_phase(self, event: PhaseEvent) -> None:
        self.phase = event.phase
        if event.cell.worktree:
            self._root = event.cell.worktree
        if event.phase is Phase.EXECUTING:
            self._set_activity("prompting the agent")
        elif event.phase is Phase.TESTING:
            self._set_activity(f"running tests: {event.message}" if event.message else "running tests")
        elif event.phase is Phase.PENDING:
            self._set_activity(event.message or "waiting")
        else:
            self._set_activity(event.phase.value.lower() if not event.phase.terminal else "")
        self._touch()

    def on_event(self, event: Event) -> None:
        if isinstance(event, ToolUpdate):
            if is_wrapped_command(str(event.input.get("command") or "")):
                return  # Reactor's own test run, not the agent
            description = self.redactor.text(_describe_tool(event.tool, event.input, self._root))
            if event.status == "running":
                self.tool_calls += 1
                self._running[event.call_id] = description
                self.tool = event.tool
                self._set_activity(description)
            elif event.status in ("completed", "error"):
                self._running.pop(event.call_id, None)
                if not self._running:
                    self.tool = None
                    self._set_activity("thinking")
            self._touch()
        elif isinstance(event, FileEdited):
            path = _relative(event.file, self._root)
            if path not in self.files:
                self.files.append(path)
                if len(self.files) == 1:
                    self._milestone("AgentEditing", f"the agent made its first change: {path}")
            self._touch()
        elif isinstance(event, SessionBusy):
            if self.phase is Phase.EXECUTING and not self._running and self.activity == "prompting the agent":
                self._set_activity("thinking")
        elif isinstance(event, StepStarted):
            if self.phase is Phase.EXECUTING and not self._running:
                self._set_activity("thinking")
            self._touch()
        elif isinstance(event, StepFinished):
            if event.model:
                self.model = event.model
            self.turns += 1
            self._check_budget()
            self._touch()
        elif isinstance(event, SessionRetry):
            self._milestone(f"ModelRetrying-{event.attempt}",
                            f"OpenCode retries the model (attempt {event.attempt}): {shorten(event.message, 200)}",
                            warning=True, reason="ModelRetrying")
            self._touch()

    # -- outputs --

    def snapshot(self) -> dict[str, Any]:
        """The progress as written to status.progress (every key is declared in the CRD)."""
        spend = self.control.spend
        files = [self.redactor.text(f) for f in self.files[:MAX_FILES]]
        return {
            "activity": shorten(self.activity, ACTIVITY_CHARS),
            "tool": self.tool,
            "steps": self.turns,
            "toolCalls": self.tool_calls,
            "filesTouched": files,
            "filesTouchedCount": len(self.files),
            "inputTokens": spend.tokens.input_tokens,
            "outputTokens": spend.tokens.output_tokens,
            "totalTokens": spend.total_tokens,
            "cost": round(spend.cost, 6),
            "costDisplay": f"${spend.cost:.4f}",
            "lastActivityTime": self.last_activity,
        }

    # -- internals --

    def _set_activity(self, activity: str) -> None:
        if activity != self.activity:
            self.activity = activity
            self.version += 1

    def _touch(self) -> None:
        self.last_activity = utc_now()
        self.last_activity_monotonic = time.monotonic()
        self.version += 1

    def _milestone(self, key: str, message: str, warning: bool = False, reason: str | None = None) -> None:
        if key in self._milestones:
            return
        self._milestones.add(key)
        if self.on_milestone is not None:
            self.on_milestone(Milestone(reason or key, self.redactor.text(message), warning))

    def _check_budget(self) -> None:
        budget, spend = self.control.budget, self.control.spend
        if budget.max_cost and spend.cost >= BUDGET_WARNING * budget.max_cost:
            self._milestone("BudgetWarning", f"{spend.cost / budget.max_cost:.0%} of maxCost ${budget.max_cost:g} "
                            f"spent (${spend.cost:.4f})", warning=True)
        if budget.max_tokens and spend.total_tokens >= BUDGET_WARNING * budget.max_tokens:
            self._milestone("BudgetWarning", f"{spend.total_tokens / budget.max_tokens:.0%} of maxTokens "
                            f"{budget.max_tokens} used ({spend.total_tokens} tokens)", warning=True)
