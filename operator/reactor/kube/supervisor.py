"""Runs AgentTasks: one asyncio task per object, outside kopf's handlers.

Handlers only hand objects over (admit, resume, stop), so a long task never delays its
own deletion (kopf #936), and deletion works the same whether or not a run is in memory:
a delete with nothing running (the operator restarted meanwhile) reaps the recorded cell.

Each run has one exit that writes its status (``_run``, like Tekton's TaskRun reconciler):
the workflow reports phases and its verdict through the run's ``TaskStatus``; verdicts
reached without a run (a missing Secret, restarts used up) and the requeue on shutdown go
through the same object, which writes nothing after a terminal phase.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s

from reactor.errors import ConfigurationError
from reactor.infra.git import git
from reactor.infra.mirrors import RepositoryMirrors
from reactor.infra.processes import is_marked_for, kill_process_group
from reactor.kube.resource import AgentTaskSpec, TaskRef, parse_time
from reactor.kube.secrets import SecretReader
from reactor.kube.status import StatusWriter, TaskStatus
from reactor.workflow.engine import Engine
from reactor.workflow.origin import MirrorOrigin
from reactor.workflow.tcr import run_task
from reactor.workflow.types import Outcome, Phase, Reason, TaskResult

log = logging.getLogger(__name__)

# A run interrupted by an operator crash is started once more; after that it fails with
# reason OperatorRestarted instead of looping. (A resumed push is not a new attempt.)
MAX_ATTEMPTS = 2
TERMINAL = (Phase.SUCCEEDED.value, Phase.FAILED.value)
# Phases in which the tests have passed: a commit found on the result branch is the result.
COMMITTED_PHASES = (Phase.COMMITTING.value, Phase.PUSHING.value)


@dataclass
class _Run:
    task: asyncio.Task
    status: TaskStatus  # its one writer: says whether the run reached a verdict


class TaskSupervisor:
    def __init__(self, engine: Engine, api_client: k8s.ApiClient):
        self.engine = engine
        self.status = StatusWriter(api_client, (engine.confinement.enabled, engine.confinement.status.message))
        self.secrets = SecretReader(api_client)
        self.mirrors = RepositoryMirrors(engine.work_dir / "mirrors")
        self._runs: dict[str, _Run] = {}
        self._stopping = False

    # -- what the handlers call --

    async def admit(self, body: Any) -> None:
        """A new AgentTask: start it."""
        if (body.get("status") or {}).get("phase") in TERMINAL or body["metadata"]["uid"] in self._runs:
            return
        self._start(body, attempt=1)

    async def resume(self, body: Any) -> None:
        """The operator (re)started and finds this object. A finished task is left alone; an
        interrupted one has its orphaned cell reaped and is resumed at its push (when it had
        committed), retried, or failed."""
        ref = TaskRef.from_body(body)
        status = body.get("status") or {}
        phase = status.get("phase")
        if phase in TERMINAL or ref.uid in self._runs:
            return
        attempts = int(status.get("attempts") or 0)
        if phase in (None, Phase.PENDING.value):  # not started, or requeued by a clean shutdown
            self._start(body, attempt=max(attempts, 1))  # a clean shutdown costs no attempt
            return
        previous = status.get("result") or {}
        # Only a commit made after the tests passed is a result; any other (the agent's own)
        # goes with the reaped worktree, so the retry starts from a fresh branch.
        committed = bool(previous.get("commit")) or phase in COMMITTED_PHASES
        kept = await self.reap(ref, status, keep_results=committed)
        commit = previous.get("commit") or (kept[0] if kept else None)
        if commit is not None:
            message = f"operator restarted during {phase}; resuming at the push of {commit[:12]}"
            await self.status.event(ref, "Retrying", message, warning=True)
            self._start(body, attempt=max(attempts, 1), resume_commit=commit, previous_result=previous)
        elif attempts < MAX_ATTEMPTS:
            message = f"operator restarted during {phase}; orphaned cell cleaned up, running again"
            await self.status.event(ref, "Retrying", message, warning=True)
            self._start(body, attempt=attempts + 1)
        else:
            message = f"operator restarted during {phase}; orphaned cell cleaned up; no attempts left"
            verdict = TaskStatus(self.status, ref, body["metadata"].get("generation"), attempts)
            await verdict.finish(TaskResult(task_id=ref.name, outcome=Outcome.FAILED,
                                            reason=Reason.OPERATOR_RESTARTED, message=message))

    async def start(self) -> None:
        """After the startup sweep, before the first task (a fleet replica joins here)."""

    async def stop(self, body: Any) -> str | None:
        """The object is being deleted: stop its run at once and leave nothing behind. (A
        push already begun ends first and its verdict is written: see run_task.) Returns why
        the deletion must wait (a fleet: another replica still runs the cell), else None."""
        ref = TaskRef.from_body(body)
        status = body.get("status") or {}
        run = self._runs.get(ref.uid)
        if run is not None:
            run.task.cancel()
            await asyncio.wait([run.task])  # the run tears its cell down before it ends
        finished = run is not None and run.status.finished
        await self.reap(ref, status, keep_results=False)
        await self._forget_result(body, status)
        phase = status.get("phase")
        if phase not in TERMINAL and not finished:
            await self.status.event(ref, Reason.CANCELLED.value,
                                    f"deleted during {phase or 'Pending'}: stopped; its cell was removed", warning=True)
        return None

    async def shutdown(self) -> None:
        """Operator stopping: stop every cell; the tasks go back to Pending and run again on
        the next start (a task already pushing finishes its push and reports it)."""
        self._stopping = True
        runs = [run.task for run in self._runs.values()]
        for run in runs:
            run.cancel()
        if runs:
            await asyncio.wait(runs)

    # -- running --

    def _start(self, body: Any, attempt: int, resume_commit: str | None = None,
               previous_result: dict | None = None) -> None:
        ref = TaskRef.from_body(body)
        status = TaskStatus(self.status, ref, body["metadata"].get("generation"), attempt, previous_result)
        started_at = parse_time((body.get("status") or {}).get("startTime"))
        task = asyncio.create_task(self._run(ref, body["spec"], status, started_at, resume_commit),
                                   name=f"agenttask {ref}")
        run = self._runs[ref.uid] = _Run(task, status)
        task.add_done_callback(lambda _: self._runs.pop(ref.uid, None) if self._runs.get(ref.uid) is run else None)

    async def _run(self, ref: TaskRef, raw_spec: dict, status: TaskStatus, started_at: float | None,
                   resume_commit: str | None, take_capacity: bool = True) -> None:
        """The run's one exit: every way it ends is written through ``status``.
        ``take_capacity=False``: the caller holds a capacity slot already (a fleet replica
        claims a task only once it has one)."""
        try:
            spec = AgentTaskSpec.model_validate(raw_spec)
            try:
                secrets = await self.secrets.for_task(ref, spec)
            except ConfigurationError as exc:
                await status.finish(TaskResult(task_id=spec.task_id or ref.name, outcome=Outcome.FAILED,
                                               reason=Reason.INVALID_INPUT, message=str(exc)))
                return
            origin = self._origin(ref, spec, secrets)
            task = spec.to_task_spec(ref, origin.path, secrets.env, started_at)
            confined, message = self.status.confinement  # said on every task: never a silent downgrade
            await self.status.event(ref, "Confined" if confined else "Unconfined", message, warning=not confined)
            await run_task(task, self.engine, status.report, cell_id=ref.cell_id,
                           priority=(ref.creation, ref.namespace, ref.name), origin=origin,
                           resume_commit=resume_commit, take_capacity=take_capacity)
        except asyncio.CancelledError:
            if self._stopping:
                await status.requeue(Reason.OPERATOR_SHUTDOWN, "operator stopped; the task runs again when it restarts")
            raise
        except Exception as exc:  # a bug must end the task visibly, not leave it hanging
            log.exception("%s: internal error", ref)
            try:
                await status.finish(TaskResult(task_id=ref.name, outcome=Outcome.FAILED, reason=Reason.INTERNAL_ERROR,
                                               message=f"internal error: {type(exc).__name__}: {exc}"))
            except Exception:  # e.g. the status write itself was forbidden: logged by the writer
                log.exception("%s: cannot record the internal error", ref)

    def _origin(self, ref: TaskRef, spec: AgentTaskSpec, secrets: Any) -> MirrorOrigin:
        """Where the task's repository is fetched from and its result pushed to."""
        return MirrorOrigin(self.mirrors, spec.repository.url, secrets.git, pushes=spec.repository.push)

    # -- orphans --

    async def reap(self, ref: TaskRef, status: dict, *, keep_results: bool) -> list[str]:
        """Kill a cell's server recorded in status (only if it still carries this cell's
        marker: the PID may have been reused) and remove its worktree. A result branch that
        holds a commit is kept when ``keep_results`` (its head is returned), else deleted."""
        cell = status.get("cell") or {}
        cell_id = cell.get("cellId") or ref.cell_id
        pid = cell.get("serverPid")
        if pid and is_marked_for(int(pid), cell_id):
            log.warning("%s: killing orphaned server pid %s", ref, pid)
            await asyncio.to_thread(kill_process_group, int(pid))
        removed = await asyncio.to_thread(self.engine.worktrees.remove_slot, cell_id)
        kept = []
        for worktree in removed:
            head = await self._head(worktree.repo, worktree.branch)
            if head and keep_results:
                kept.append(head)
            elif head:
                await asyncio.to_thread(self.mirrors.delete_branch, worktree.repo, worktree.branch)
        return kept

    async def _forget_result(self, body: Any, status: dict) -> None:
        """A deleted task's unpushed commit (its push failed) goes with it: the mirror is the
        operator's, not the user's."""
        result = status.get("result") or {}
        branch, commit = result.get("branch"), result.get("commit")
        if not branch or not commit or result.get("pushed"):
            return
        mirror = self.mirrors.path_for(body["spec"]["repository"]["url"])
        if mirror.exists() and await self._head(mirror, branch) == commit:
            await asyncio.to_thread(self.mirrors.delete_branch, mirror, branch)

    @staticmethod
    async def _head(repo: Any, branch: str) -> str:
        return await asyncio.to_thread(git, repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}",
                                       check=False)
