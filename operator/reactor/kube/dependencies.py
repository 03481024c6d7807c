"""Tasks on tasks: whether an AgentTask with ``spec.dependsOn`` may start, must wait, or fails.

The decision is a pure function of the task and what the API server shows of the tasks of
its namespace (``decide``); the supervisor reads them, asks, and writes the answer through
the task's TaskStatus. A task starts at its parents' **result commits** (status.result.commit
of each, in dependsOn order), never at their branches, which may move; several parents are
merged by Reactor in the engine (workflow/tcr.py, infra/worktrees.integrate).

Rules (each a unit test in tests/unit/test_dependencies.py):
- every parent Succeeded with a result commit: start from their commits;
- a parent Failed, deleted (or being deleted), replaced by a new object of the same name
  (another uid than the one this task saw), working on another repository, or the graph has
  a cycle through this task: fail with DependencyFailed (only this task and, in turn, its own
  dependents: siblings are not touched);
- otherwise wait (DependenciesPending), naming the parents not yet done. A parent that does
  not exist yet is waited for (GitOps applies a directory in any order); one that this task
  saw and that is gone has been deleted.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from reactor.kube.resource import AgentTaskStatus
from reactor.workflow.types import Reason


@dataclass(frozen=True)
class TaskView:
    """What a dependent needs to know of another task, read from its object."""

    name: str
    uid: str
    phase: str | None
    reason: str  # the Succeeded condition's reason
    commit: str | None  # status.result.commit
    url: str  # spec.repository.url
    depends_on: tuple[str, ...]
    deleting: bool = False
    branch: str | None = None  # its result branch, once pushed to the origin
    integrated: bool = False  # its result is on the base branch: its PR merged, or its merge queue integrated it

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> TaskView:
        meta, spec, status = body["metadata"], body.get("spec") or {}, AgentTaskStatus.of(body)
        result = status.result
        integrated = ((status.pull_request is not None and status.pull_request.state == "merged")
                      or (status.integration is not None and status.integration.state == "Integrated"))
        return cls(name=meta["name"], uid=meta.get("uid") or "", phase=status.phase.value if status.phase else None,
                   reason=status.reason or "", commit=status.commit,
                   url=(spec.get("repository") or {}).get("url") or "",
                   depends_on=tuple(spec.get("dependsOn") or ()), deleting=bool(meta.get("deletionTimestamp")),
                   branch=result.branch if result is not None and result.pushed else None, integrated=integrated)


class Verdict(str, enum.Enum):
    START = "start"
    WAIT = "wait"
    FAIL = "fail"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: Reason | None = None  # DependenciesPending (WAIT) or DependencyFailed (FAIL)
    message: str = ""
    waiting_on: tuple[str, ...] = ()  # parents not yet done (WAIT)
    start_commits: tuple[str, ...] = ()  # the parents' result commits, in dependsOn order (START)
    # Every parent seen, name -> uid: recorded in status, so a parent deleted and created
    # again under the same name is known for another task, not waited for.
    seen: dict[str, str] = field(default_factory=dict)


def decide(me: TaskView, tasks: Mapping[str, TaskView], seen: Mapping[str, str]) -> Decision:
    """``me``: the dependent task; ``tasks``: the tasks of its namespace by name (as listed
    now); ``seen``: the parents' uids it recorded earlier (name -> uid)."""
    now_seen = dict(seen)
    failed: list[str] = []
    waiting: list[str] = []
    for name in me.depends_on:
        parent = tasks.get(name)
        if parent is None or parent.deleting:
            if name in seen or parent is not None:
                failed.append(f"{name} was deleted")
            else:
                waiting.append(name)
            continue
        if name in seen and seen[name] != parent.uid:
            failed.append(f"{name} was deleted and created again (a new task, not the one this task waited for)")
            continue
        now_seen[name] = parent.uid
        if parent.url != me.url:
            failed.append(f"{name} works on another repository ({parent.url})")
        elif parent.phase == "Failed":
            failed.append(f"{name} failed ({parent.reason or 'Failed'})")
        elif parent.phase == "Succeeded":
            if not parent.commit:
                failed.append(f"{name} succeeded without a result commit")
        else:
            waiting.append(name)
    cycle = _cycle_through(me, tasks)
    if cycle:
        failed.append("dependency cycle: " + " -> ".join(cycle))
    if failed:
        return Decision(Verdict.FAIL, Reason.DEPENDENCY_FAILED, "; ".join(failed) + "; not started", seen=now_seen)
    if waiting:
        missing = [n for n in waiting if n not in tasks]
        detail = f" ({', '.join(missing)} not created yet)" if missing else ""
        return Decision(Verdict.WAIT, Reason.DEPENDENCIES_PENDING,
                        f"waiting for {', '.join(waiting)} to succeed{detail}", waiting_on=tuple(waiting), seen=now_seen)
    return Decision(Verdict.START, start_commits=tuple(tasks[n].commit or "" for n in me.depends_on), seen=now_seen,
                    message="starting at the result of " + ", ".join(
                        f"{n} ({(tasks[n].commit or '')[:12]})" for n in me.depends_on))


def _cycle_through(me: TaskView, tasks: Mapping[str, TaskView]) -> list[str]:
    """A path me -> ... -> me along dependsOn, if there is one (only unfinished tasks count:
    a finished parent's own dependencies no longer matter)."""
    path: list[str] = [me.name]
    visited: set[str] = set()

    def walk(name: str) -> bool:
        node = me if name == me.name else tasks.get(name)
        if node is None or (name != me.name and node.phase in ("Succeeded", "Failed")):
            return False
        for parent in node.depends_on:
            if parent == me.name:
                path.append(parent)
                return True
            if parent in visited:
                continue
            visited.add(parent)
            path.append(parent)
            if walk(parent):
                return True
            path.pop()
        return False

    return path if walk(me.name) else []
