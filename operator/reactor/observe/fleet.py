"""The fleet page's data: every task this process knows (``TaskViews``), with what the web
page and metrics show, and each namespace's spend today (``SpendLedger``)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from reactor.workflow.types import Phase


@dataclass
class TaskView:
    namespace: str
    name: str
    phase: str = "Pending"
    reason: str = ""
    message: str = ""
    created: str = ""  # RFC 3339, UTC
    started: str | None = None
    finished: str | None = None
    activity: str = ""
    cost: float = 0.0
    tokens: int = 0
    model: str = ""
    files: list[str] = field(default_factory=list)
    commit: str | None = None
    pull_request: str | None = None  # its URL (spec.result.kind pullRequest)
    pull_request_state: str = ""  # open | merged | closed
    depends_on: list[str] = field(default_factory=list)  # spec.dependsOn: the tasks it builds on
    waiting_on: list[str] = field(default_factory=list)  # those it still waits for (DependenciesPending)

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    @property
    def running(self) -> bool:
        return self.phase not in _TERMINAL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_TERMINAL = {phase.value for phase in Phase if phase.terminal}


class TaskViews:
    """The task list of the fleet page and the metrics: one view per task, by namespace and name."""

    def __init__(self) -> None:
        self._tasks: dict[tuple[str, str], TaskView] = {}

    def view(self, namespace: str, name: str) -> TaskView:
        """The task's view, created on first use."""
        key = (namespace, name)
        view = self._tasks.get(key)
        if view is None:
            view = self._tasks[key] = TaskView(namespace, name, created=utc_iso())
        return view

    def get(self, namespace: str, name: str) -> TaskView | None:
        return self._tasks.get((namespace, name))

    def follow(self, namespace: str, name: str, *, created: str, phase: str | None, reason: str, message: str,
               depends_on: list[str], waiting_on: list[str]) -> None:
        """What the API server shows of a task (every replica sees every task change): who it
        depends on and waits for, and where it is. Tasks outside the graph are left to the
        runs that show them. A phase never goes back here (a run updates its own view as it
        goes; a change seen late must not undo that)."""
        view = self._tasks.get((namespace, name))
        if view is None:
            if not depends_on:
                return
            view = self._tasks[(namespace, name)] = TaskView(namespace, name, created=created or utc_iso())
        view.depends_on = list(depends_on)
        if phase and Phase(phase).rank < Phase(view.phase).rank:
            return  # seen late: the view already shows a later state
        view.waiting_on = list(waiting_on)
        if phase:
            if phase != view.phase or phase == Phase.PENDING.value:
                view.reason, view.message = reason, message
            view.phase = phase

    def remove(self, namespace: str, name: str) -> None:
        self._tasks.pop((namespace, name), None)

    def tasks(self) -> list[TaskView]:
        return sorted(self._tasks.values(), key=lambda v: (v.created, v.namespace, v.name))

    def by_phase(self) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        for view in self._tasks.values():
            counts[(view.namespace, view.phase)] = counts.get((view.namespace, view.phase), 0) + 1
        return counts


def utc_iso(moment: dt.datetime | None = None) -> str:
    return (moment or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")


def utc_day(moment: dt.datetime | None = None) -> str:
    return (moment or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%d")


@dataclass
class DaySpend:
    day: str
    cost: float = 0.0
    tokens: int = 0


SpendListener = Callable[[str, float, int], None]


class SpendLedger:
    """Spend per namespace for the current UTC day: every model step of every task, as it
    happens. Listeners (the operator's spend limits) get each increment."""

    def __init__(self, clock: Callable[[], str] = utc_day) -> None:
        self._clock = clock
        self._days: dict[str, DaySpend] = {}
        self._listeners: list[SpendListener] = []

    def subscribe(self, listener: SpendListener) -> None:
        self._listeners.append(listener)

    def today(self, namespace: str) -> DaySpend:
        day = self._clock()
        spend = self._days.get(namespace)
        if spend is None or spend.day != day:
            spend = self._days[namespace] = DaySpend(day)
        return spend

    def add(self, namespace: str, cost: float, tokens: int) -> None:
        spend = self.today(namespace)
        spend.cost += cost
        spend.tokens += tokens
        for listener in list(self._listeners):
            listener(namespace, cost, tokens)

    def seed(self, namespace: str, day: str, cost: float, tokens: int) -> None:
        """After a restart: what was spent earlier today (the larger of what we knew and this)."""
        spend = self.today(namespace)
        if day == spend.day and cost > spend.cost:
            spend.cost, spend.tokens = cost, max(tokens, spend.tokens)

    def namespaces(self) -> dict[str, DaySpend]:
        return {ns: self.today(ns) for ns in list(self._days)}


QUEUE_FINISHED_SHOWN = 10  # the most recent integrated/ejected items a queue shows after its waiting ones


@dataclass
class QueueView:
    """One merge queue as the page draws it (the replica driving it fills it in)."""

    namespace: str
    name: str
    branch: str = ""
    depth: int = 0
    base_green: bool = True
    last_integration: str = ""
    last_integration_at: str | None = None
    test_runs: int = 0
    integrated: int = 0
    ejected: int = 0
    # In order: those waiting or being integrated (queue order), then the latest finished.
    # Each: task, state (Queued/Integrating/Integrated/Ejected), position, reason, commit.
    items: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class QueueViews:
    """The merge queues this process drives, for the fleet page."""

    def __init__(self) -> None:
        self._queues: dict[tuple[str, str], QueueView] = {}

    def update(self, view: QueueView) -> None:
        self._queues[(view.namespace, view.name)] = view

    def remove(self, namespace: str, name: str) -> None:
        self._queues.pop((namespace, name), None)

    def queues(self) -> list[QueueView]:
        return [self._queues[key] for key in sorted(self._queues)]
