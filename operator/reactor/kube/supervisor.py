"""Runs AgentTasks: one asyncio task per object, outside kopf's handlers.

Handlers only hand objects over (admit, resume, stop), so a long task never delays its
own deletion (kopf #936), and deletion works the same whether or not a run is in memory:
a delete with nothing running (the operator restarted meanwhile) reaps the recorded cell.

Each run has one exit that writes its status (``_run``, like Tekton's TaskRun reconciler):
the workflow reports phases and its verdict through the run's ``TaskStatus``; verdicts
reached without a run (a missing Secret, restarts used up) and the requeue on shutdown go
through the same object, which writes nothing after a terminal phase.

Every run is observed (reactor.observe): its cell's events and phases feed live progress
(``status.progress``, rate-limited, written by the same TaskStatus), the transcript, metrics
and the fleet page; its TaskControl enforces ``spec.budget`` and lets a namespace's
SpendLimit stop it. A SpendLimit that is crossed holds new tasks in Pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s

from reactor.errors import ConfigurationError
from reactor.infra.git import git
from reactor.infra.mirrors import RepositoryMirrors
from reactor.infra.processes import find_marked_processes, is_marked_for, kill_process_group
from reactor.infra.worktrees import safe_component
from reactor.kube.dependencies import Decision, TaskView, Verdict, decide
from reactor.kube.progress import ProgressPublisher
from reactor.kube.resource import GROUP, PLURAL, VERSION, AgentTaskSpec, TaskRef, parse_time
from reactor.kube.secrets import SecretReader, TaskSecrets
from reactor.kube.spendlimits import SpendLimits
from reactor.kube.status import StatusWriter, TaskStatus
from reactor.observe.local import observatory_for
from reactor.observe.observation import Observatory
from reactor.opencode.events import Event
from reactor.opencode.models import TokenUsage
from reactor.workflow.control import Spend, TaskControl
from reactor.workflow.engine import Engine
from reactor.workflow.origin import MirrorOrigin
from reactor.workflow.tcr import run_task
from reactor.workflow.types import Outcome, Phase, Reason, TaskResult, TaskSpec

WaitingCallback = Callable[[Reason, str], Awaitable[None]]

log = logging.getLogger(__name__)

# A run interrupted by an operator crash is started once more; after that it fails with
# reason OperatorRestarted instead of looping. (A resumed push is not a new attempt.)
MAX_ATTEMPTS = 2
TERMINAL = (Phase.SUCCEEDED.value, Phase.FAILED.value)
# Phases in which the tests have passed: a commit found on the result branch is the result.
COMMITTED_PHASES = (Phase.COMMITTING.value, Phase.PUSHING.value)
# A task waiting on its dependencies is woken by their events (task_changed); it also looks
# again this often, in case an event was missed (a watch reconnecting).
DEPENDENCY_RECHECK = 30.0


@dataclass
class _Run:
    task: asyncio.Task
    status: TaskStatus  # its one writer: says whether the run reached a verdict


class TaskSupervisor:
    def __init__(self, engine: Engine, api_client: k8s.ApiClient, *, namespaces: list[str] | None = None,
                 observatory: Observatory | None = None, progress_interval: float = 2.0):
        self.engine = engine
        self.namespaces = namespaces or []  # watched; [] = all
        self.observatory = observatory or observatory_for(engine)
        self.status = StatusWriter(api_client, (engine.confinement.enabled, engine.confinement.status.message),
                                   self.observatory.metrics)
        self.secrets = SecretReader(api_client)
        self.mirrors = RepositoryMirrors(engine.work_dir / "mirrors")
        self.limits = SpendLimits(api_client, self.observatory.spend, self.stop_namespace)
        self.progress_interval = progress_interval
        self._runs: dict[str, _Run] = {}
        self._controls: dict[str, tuple[TaskRef, TaskControl]] = {}  # running tasks' stop switches
        self._background: set[asyncio.Task] = set()
        self._stopping = False
        self.custom = k8s.CustomObjectsApi(api_client)
        # Tasks waiting on their dependencies, by the (namespace, name) of each parent: woken
        # when that parent changes.
        self._dependents: dict[tuple[str, str], set[asyncio.Event]] = {}

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
        if phase in TERMINAL:
            self._remember_finished(ref, status)
        if phase in TERMINAL or ref.uid in self._runs:
            return
        attempts = int(status.get("attempts") or 0)
        if phase in (None, Phase.PENDING.value):  # not started, or requeued by a clean shutdown
            self._start(body, attempt=max(attempts, 1))  # a clean shutdown costs no attempt
            return
        previous = status.get("result") or {}
        session = _resumable_session(body)
        if session is not None:
            # spec.resume reattach: the agent's checkout and session stay; only its server goes.
            await self.reap(ref, status, keep_results=False, keep_cell=True)
            message = (f"operator restarted during {phase}; reopening the agent's session {session} "
                       "on its checkout as it was")
            await self.status.event(ref, "Retrying", message, warning=True)
            self._start(body, attempt=attempts + 1, reopen_session=session)
            return
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
            self._observed(verdict)
            await verdict.finish(TaskResult(task_id=ref.name, outcome=Outcome.FAILED,
                                            reason=Reason.OPERATOR_RESTARTED, message=message))

    async def resumable_cells(self) -> frozenset[str]:
        """Before the startup sweep: the cells of the watched tasks that will be reopened."""
        spaces = self.namespaces or [None]
        bodies: list[Any] = []
        try:
            for namespace in spaces:
                if namespace is None:
                    listed = await asyncio.to_thread(self.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL)
                else:
                    listed = await asyncio.to_thread(self.custom.list_namespaced_custom_object, GROUP, VERSION,
                                                     namespace, PLURAL)
                bodies += listed.get("items") or []
        except Exception as exc:  # IG: then nothing is kept, and interrupted tasks run again from the start
            log.warning("cannot list the tasks to resume (%s): interrupted tasks will run again from the start", exc)
            return frozenset()
        return resumable_cells(bodies)

    def task_changed(self, body: Any) -> None:
        """Any AgentTask changed (or went away): wake the tasks that depend on it."""
        meta = body["metadata"]
        for event in self._dependents.get((meta["namespace"], meta["name"]), ()):
            event.set()

    async def start(self) -> None:
        """After the startup sweep, before the first task: the SpendLimits are read (no task
        starts past one), then a fleet replica joins here."""
        await self.limits.load(self.namespaces)
        await self.limits.start()

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
        self.observatory.forget(ref.namespace, ref.name)  # its transcript goes with it
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
        await self.limits.stop()  # the last spend counts are written

    # -- running --

    def _start(self, body: Any, attempt: int, resume_commit: str | None = None,
               previous_result: dict | None = None, reopen_session: str | None = None) -> None:
        ref = TaskRef.from_body(body)
        status = TaskStatus(self.status, ref, body["metadata"].get("generation"), attempt, previous_result)
        status.seen_parents = {d["name"]: d.get("uid") or "" for d in (body.get("status") or {}).get("dependencies") or []
                               if isinstance(d, dict) and d.get("name")}
        if attempt > 1 or resume_commit is not None:  # the task's budget covers all its attempts
            status.previous_progress = (body.get("status") or {}).get("progress")
        started_at = parse_time((body.get("status") or {}).get("startTime"))
        status.reopen_session = reopen_session
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
                self._observed(status)
                await status.finish(TaskResult(task_id=spec.task_id or ref.name, outcome=Outcome.FAILED,
                                               reason=Reason.INVALID_INPUT, message=str(exc)))
                return
            start_from: list[str] = []
            if spec.depends_on and resume_commit is None:
                decision = await self.wait_for_dependencies(ref, spec, status)
                if decision.verdict is Verdict.FAIL:
                    self._observed(status)
                    await status.finish(TaskResult(task_id=spec.task_id or ref.name, outcome=Outcome.FAILED,
                                                   reason=Reason.DEPENDENCY_FAILED, message=decision.message))
                    return
                start_from = list(decision.start_from)
            origin = self._origin(ref, spec, secrets)
            task = spec.to_task_spec(ref, origin.path, secrets.env, started_at, start_from)
            confined, message = self.status.confinement  # said on every task: never a silent downgrade
            await self.status.event(ref, "Confined" if confined else "Unconfined", message, warning=not confined)
            if not take_capacity or resume_commit is not None:  # (a resumed push needs no cell)
                await self._execute(ref, task, secrets, status, origin, resume_commit)
                return
            gate, priority = self.engine.capacity, (ref.creation, ref.namespace, ref.name)
            while True:
                await self.wait_for_spend_limit(ref, status.waiting)
                async with gate.slot(priority, on_reason=status.waiting):
                    if self.limits.blocked(ref.namespace):
                        continue  # crossed while this task waited for a cell: hand the slot on
                    await self._execute(ref, task, secrets, status, origin, None)
                return
        except asyncio.CancelledError:
            if self._stopping:
                await status.requeue(Reason.OPERATOR_SHUTDOWN, "operator stopped; the task runs again when it restarts")
            raise
        except Exception as exc:  # a bug must end the task visibly, not leave it hanging
            log.exception("%s: internal error", ref)
            try:
                self._observed(status)
                await status.finish(TaskResult(task_id=ref.name, outcome=Outcome.FAILED, reason=Reason.INTERNAL_ERROR,
                                               message=f"internal error: {type(exc).__name__}: {exc}"))
            except Exception:  # e.g. the status write itself was forbidden: logged by the writer
                log.exception("%s: cannot record the internal error", ref)

    async def _execute(self, ref: TaskRef, task: TaskSpec, secrets: TaskSecrets, status: TaskStatus,
                       origin: MirrorOrigin, resume_commit: str | None) -> None:
        """One observed run of the workflow (holding a slot, unless it only resumes a push)."""
        control = TaskControl(_spent_before(status.previous_progress))
        observation = self.observatory.observe(
            ref.namespace, ref.name, control, secrets.values(),
            lambda m: self._spawn(self.status.event(ref, m.reason, m.message, warning=m.warning)))
        observation.view.created = ref.creation or observation.view.created
        if status.attempt > 1:
            observation.note(f"attempt {status.attempt}")
        publisher = None
        if self.progress_interval > 0:  # 0: no live status.progress (the verdict still carries the last)
            publisher = ProgressPublisher(observation.progress, status.write_progress, self.progress_interval)
            publisher.start()
        status.observe(observation, publisher)

        def watch(event: Event) -> None:
            observation.on_event(event)
            if publisher is not None:
                publisher.poke()

        self._controls[ref.uid] = (ref, control)
        try:
            await run_task(task, self.engine, status.report, cell_id=ref.cell_id,
                           priority=(ref.creation, ref.namespace, ref.name), origin=origin,
                           resume_commit=resume_commit, take_capacity=False, control=control, watchers=[watch],
                           reopen_session=status.reopen_session)
        finally:
            self._controls.pop(ref.uid, None)
            if publisher is not None:
                await publisher.stop()

    def _observed(self, status: TaskStatus) -> None:
        """A verdict reached without a run (a missing Secret, a bug) is counted and shown too."""
        if status.observation is None:
            status.observation = self.observatory.observe(status.ref.namespace, status.ref.name, TaskControl())

    # -- dependencies (spec.dependsOn) --

    async def wait_for_dependencies(self, ref: TaskRef, spec: AgentTaskSpec, status: TaskStatus) -> Decision:
        """Hold the task in Pending (DependenciesPending, status.waitingOn) until its parents
        succeed (START: their result commits) or one cannot be built on (FAIL). The rules are
        kube/dependencies.py's; here only the reading and the writing."""
        me = TaskView(name=ref.name, uid=ref.uid, phase=None, reason="", commit=None, url=spec.repository.url,
                      depends_on=tuple(spec.depends_on))
        wake = asyncio.Event()
        keys = [(ref.namespace, name) for name in spec.depends_on]
        for key in keys:
            self._dependents.setdefault(key, set()).add(wake)
        try:
            seen = dict(status.seen_parents)
            while True:
                wake.clear()  # before reading: a change made meanwhile wakes the next wait
                tasks = await self._namespace_tasks(ref.namespace)
                decision = decide(me, tasks, seen)
                seen = decision.seen
                parents = [{"name": name, "uid": uid, "commit": tasks[name].commit if name in tasks else None}
                           for name, uid in sorted(seen.items())]
                if decision.verdict is Verdict.START:
                    await status.dependencies_met(parents, decision.message)
                    return decision
                if decision.verdict is Verdict.FAIL:
                    return decision
                assert decision.reason is not None
                await status.waiting(decision.reason, decision.message, waitingOn=", ".join(decision.waiting_on),
                                     dependencies=parents)
                self.observatory.fleet.view(ref.namespace, ref.name).message = decision.message
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), DEPENDENCY_RECHECK)
        finally:
            for key in keys:
                waiters = self._dependents.get(key)
                if waiters is not None:
                    waiters.discard(wake)
                    if not waiters:
                        del self._dependents[key]

    async def _namespace_tasks(self, namespace: str) -> dict[str, TaskView]:
        listed = await asyncio.to_thread(self.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL)
        return {item["metadata"]["name"]: TaskView.from_body(item) for item in listed.get("items") or []}

    # -- spend limits --

    async def wait_for_spend_limit(self, ref: TaskRef, say: WaitingCallback) -> None:
        """Hold a new task in Pending while a SpendLimit of its namespace is exceeded."""
        said = None
        while (reason := self.limits.blocked(ref.namespace)) is not None:
            if reason != said:
                message = f"{reason}; waiting until the period ends or the limit is raised"
                await say(Reason.SPEND_LIMIT_EXCEEDED, message)
                self.observatory.fleet.view(ref.namespace, ref.name).message = message
                said = reason
            await self.limits.wait_change(ref.namespace)

    def stop_namespace(self, namespace: str, message: str) -> None:
        """A SpendLimit of ``namespace`` was crossed: stop every task running there."""
        for ref, control in list(self._controls.values()):
            if ref.namespace == namespace:
                control.stop(Reason.SPEND_LIMIT_EXCEEDED, message)

    def _remember_finished(self, ref: TaskRef, status: dict) -> None:
        """A finished task found at start-up: shown on the page and counted by phase."""
        view = self.observatory.fleet.view(ref.namespace, ref.name)
        view.phase, view.message = status.get("phase") or "", status.get("message") or ""
        view.reason = next((c.get("reason", "") for c in status.get("conditions") or [] if c.get("type") == "Succeeded"), "")
        view.created = ref.creation or view.created
        view.started, view.finished = status.get("startTime"), status.get("completionTime")
        usage = status.get("usage") or {}
        view.cost = float(usage.get("cost") or 0.0)
        view.tokens = sum(int(usage.get(k) or 0) for k in ("inputTokens", "outputTokens", "reasoningTokens",
                                                            "cacheReadTokens", "cacheWriteTokens"))
        result = status.get("result") or {}
        view.files, view.commit = list(result.get("filesChanged") or []), result.get("commit")

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _origin(self, ref: TaskRef, spec: AgentTaskSpec, secrets: Any) -> MirrorOrigin:
        """Where the task's repository is fetched from and its result pushed to."""
        return MirrorOrigin(self.mirrors, spec.repository.url, secrets.git, pushes=spec.repository.push)

    # -- orphans --

    async def reap(self, ref: TaskRef, status: dict, *, keep_results: bool, keep_cell: bool = False) -> list[str]:
        """Kill a cell's server recorded in status (only if it still carries this cell's
        marker: the PID may have been reused) and remove its worktree. A result branch that
        holds a commit is kept when ``keep_results`` (its head is returned), else deleted.
        ``keep_cell``: only the server goes (its checkout and state dir are resumed)."""
        cell = status.get("cell") or {}
        cell_id = cell.get("cellId") or ref.cell_id
        pid = cell.get("serverPid")
        if pid and is_marked_for(int(pid), cell_id):
            log.warning("%s: killing orphaned server pid %s", ref, pid)
            await asyncio.to_thread(kill_process_group, int(pid))
        if keep_cell:
            for leftover in await asyncio.to_thread(find_marked_processes, str(self.engine.work_dir), cell_id):
                await asyncio.to_thread(kill_process_group, leftover.pid)
            return []
        removed = await asyncio.to_thread(self.engine.worktrees.remove_slot, cell_id)
        # A cell kept for reopening by the startup sweep has its state dir still.
        await asyncio.to_thread(shutil.rmtree, self.engine.cells_dir / safe_component(cell_id), True)
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


# Phases in which the agent's session holds its work: an interrupted one is reopened there.
RESUMABLE_PHASES = (Phase.EXECUTING.value, Phase.TESTING.value)


def _resumable_session(body: Any) -> str | None:
    """The OpenCode session to reopen after an operator crash: the task was interrupted in
    its agent's turn or its tests, recorded a session, and spec.resume is not restart."""
    status = body.get("status") or {}
    if (body.get("spec") or {}).get("resume", "reattach") == "restart" or status.get("phase") not in RESUMABLE_PHASES:
        return None
    if int(status.get("attempts") or 0) >= MAX_ATTEMPTS:  # it fails instead (OperatorRestarted)
        return None
    return (status.get("cell") or {}).get("sessionId") or None


def resumable_cells(bodies: list[Any]) -> frozenset[str]:
    """Cells the startup sweep must leave (checkout and state dir): those of tasks that will
    be reopened in their sessions."""
    cells = set()
    for body in bodies:
        if _resumable_session(body) is not None and not body["metadata"].get("deletionTimestamp"):
            cell = ((body.get("status") or {}).get("cell") or {}).get("cellId")
            cells.add(cell or TaskRef.from_body(body).cell_id)
    return frozenset(cells)


def _spent_before(progress: dict | None) -> Spend | None:
    """What an interrupted earlier attempt had spent (its last progress): the task's budget
    covers all its attempts."""
    if not progress:
        return None
    inp, out = int(progress.get("inputTokens") or 0), int(progress.get("outputTokens") or 0)
    other = max(0, int(progress.get("totalTokens") or 0) - inp - out)
    return Spend(TokenUsage(input_tokens=inp, output_tokens=out, cache_read_tokens=other),
                 float(progress.get("cost") or 0.0), int(progress.get("steps") or 0))
