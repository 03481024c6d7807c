"""Runs AgentTasks: one asyncio task per object, outside kopf's handlers, with one replica or many.

Handlers only hand objects over (admit, resume, observe, stop), so a long task never delays
its own deletion (kopf #936), and deletion works the same whether or not a run is in memory:
a delete with nothing running (the operator restarted meanwhile) reaps the recorded cell.

Who runs a task is the ownership policy's (kube/ownership.py): with one replica every task
is ours; in a fleet a replica claims a task once it holds a slot for it, and Leases decide
when a lost replica's tasks may be adopted. Everything else is the same code in both modes:

    take ─► admission (``_admit``: SpendLimits, spec.dependsOn; where a task may wait on something)
         ─► slot (agents, memory; oldest first)      [a fleet claims here]
         ─► restart rules (``ownership.plan``: first start, retry, reopen the session, resume
             the push, give up)
         ─► dependencies (fail, or the commits to start from) ─► secrets, spec ─► ``run_task`` ─► push ─► ``after_push`` ─► verdict

A Succeeded task whose queued result the merge queue ejected for a textual conflict is
taken back the same way for a rebase round (kube/rebase.py; ``_rebase``), or ends Conflict.

Each run has one exit that writes its status (``_run``, like Tekton's TaskRun reconciler),
and every status write of the task goes through the run's ``TaskStatus`` (kube/status.py):
the claim, why it waits, each phase, the verdict, the requeue on shutdown.

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
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kubernetes import client as k8s

from reactor.errors import ConfigurationError
from reactor.infra.cellrecords import LiveCell, verify
from reactor.infra.git import git
from reactor.infra.mirrors import RepositoryMirrors
from reactor.infra.repository_urls import RepositoryPolicy, RepositoryRefused
from reactor.infra.processes import find_marked_processes, is_marked_for, kill_process_group
from reactor.infra.servers import kill_live
from reactor.infra.worktrees import safe_component
from reactor.kube.dependencies import Decision, TaskView, Verdict, decide
from reactor.kube.fleet import FleetSettings
from reactor.kube.ownership import FleetOwnership, Ownership, Plan, SingleReplica, reopen_session
from reactor.kube.progress import ProgressPublisher
from reactor.kube import rebase
from reactor.kube.pullrequests import PullRequests, PullRequestSettings, pull_request_work
from reactor.kube.resource import (GROUP, PLURAL, VERSION, AgentTaskSpec, AgentTaskStatus, ProgressStatus, TaskRef,
                                   parse_time)
from reactor.kube.secrets import SecretReader, TaskSecrets
from reactor.kube.spendlimits import SpendLimits
from reactor.kube.status import ClaimLost, StatusWriter, TaskStatus
from reactor.observe.fleet import TaskViews
from reactor.observe.local import observatory_for
from reactor.observe.observation import Observatory
from reactor.opencode.events import Event
from reactor.opencode.models import TokenUsage
from reactor.workflow.control import Spend, TaskControl
from reactor.workflow.engine import Engine
from reactor.workflow.origin import MirrorOrigin
from reactor.workflow.recovery import ignore_and_warn
from reactor.workflow.tcr import run_task, uncancellable
from reactor.workflow.types import Outcome, Phase, PhaseEvent, Reason, TaskResult, TaskSpec

WaitingCallback = Callable[[Reason, str], Awaitable[None]]

log = logging.getLogger(__name__)


# Why a task waits: (reason, message), or (reason, message, fields of status written with it).
Held = tuple[Reason, str] | tuple[Reason, str, dict[str, Any]]
# A task waiting on its dependencies is woken by their events; it also looks again this
# often, in case an event was missed (a watch reconnecting).
DEPENDENCY_RECHECK = 30.0


class AdmissionCheck(Protocol):
    """Something a task waits on in Pending before it may take a slot (a SpendLimit; a task
    it depends on, a merge queue). Checked again once the slot is granted: a task held back
    meanwhile hands the slot on."""

    def blocked(self, ref: TaskRef, body: dict) -> Held | None:
        """Why the task must wait now (reason, message[, status fields to write with it]), or None."""

    async def changed(self, ref: TaskRef) -> None:
        """Returns when the answer may have changed."""


class SpendLimitCheck:
    """A SpendLimit of the task's namespace is exceeded: wait until the period ends or the
    limit is raised."""

    def __init__(self, limits: SpendLimits):
        self.limits = limits

    def blocked(self, ref: TaskRef, body: dict) -> tuple[Reason, str] | None:
        reason = self.limits.blocked(ref.namespace)
        if reason is None:
            return None
        return Reason.SPEND_LIMIT_EXCEEDED, f"{reason}; waiting until the period ends or the limit is raised"

    async def changed(self, ref: TaskRef) -> None:
        await self.limits.wait_change(ref.namespace)


class DependencyCheck:
    """spec.dependsOn: a task waits (DependenciesPending, status.waitingOn) until its parents
    succeed. The rules are kube/dependencies.py's ``decide``, on the supervisor's view of the
    tasks (every task event, and the startup listing); a task that must fail passes admission
    and is failed with DependencyFailed once taken (only the task's holder writes a verdict)."""

    def __init__(self, views: TaskViews | None = None) -> None:
        self.views = views  # the fleet page's: each task's place in the graph, as its events show it
        self.tasks: dict[str, dict[str, TaskView]] = {}  # namespace -> name -> view
        self.seen: dict[str, dict[str, str]] = {}  # a waiting task's uid -> parents seen (name -> uid)
        self._wake: dict[str, asyncio.Event] = {}  # a waiting task's uid -> set when a parent changes
        self._parents: dict[tuple[str, str], set[str]] = {}  # (namespace, parent) -> waiting uids

    def saw(self, event_type: str | None, body: dict) -> None:
        """A task changed (or went away): update the view, wake its dependents."""
        meta = body["metadata"]
        names = self.tasks.setdefault(meta["namespace"], {})
        if event_type == "DELETED":
            names.pop(meta["name"], None)
        else:
            names[meta["name"]] = view = TaskView.from_body(body)
            if self.views is not None:
                status = AgentTaskStatus.of(body)
                self.views.follow(meta["namespace"], meta["name"], created=meta.get("creationTimestamp") or "",
                                  phase=view.phase, reason=view.reason, message=status.message or "",
                                  depends_on=list(view.depends_on),
                                  waiting_on=[n.strip() for n in (status.waiting_on or "").split(",") if n.strip()])
        for uid in self._parents.get((meta["namespace"], meta["name"]), ()):
            self._wake[uid].set()

    def decision(self, ref: TaskRef, body: dict) -> Decision | None:
        """None: the task depends on nothing."""
        me = TaskView.from_body(body)
        if not me.depends_on:
            return None
        if ref.uid not in self.seen:
            self.seen[ref.uid] = {d.name: d.uid for d in AgentTaskStatus.of(body).dependencies}
        decision = decide(me, self.tasks.get(ref.namespace, {}), self.seen[ref.uid])
        self.seen[ref.uid] = decision.seen
        return decision

    def parents(self, ref: TaskRef) -> list[dict[str, Any]]:
        """The parents seen, as status.dependencies records them."""
        tasks = self.tasks.get(ref.namespace, {})
        return [{"name": name, "uid": uid, "commit": tasks[name].commit if name in tasks else None}
                for name, uid in sorted(self.seen.get(ref.uid, {}).items())]

    def blocked(self, ref: TaskRef, body: dict) -> Held | None:
        decision = self.decision(ref, body)
        if decision is None or decision.verdict is not Verdict.WAIT:
            return None
        assert decision.reason is not None
        wake = self._wake.setdefault(ref.uid, asyncio.Event())
        wake.clear()  # (a change after this reading wakes the next wait)
        for name in TaskView.from_body(body).depends_on:
            self._parents.setdefault((ref.namespace, name), set()).add(ref.uid)
        return decision.reason, decision.message, {"waitingOn": ", ".join(decision.waiting_on),
                                                   "dependencies": self.parents(ref)}

    async def changed(self, ref: TaskRef) -> None:
        wake = self._wake.setdefault(ref.uid, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), DEPENDENCY_RECHECK)

    def forget(self, ref: TaskRef) -> None:
        """The task's run ended."""
        self.seen.pop(ref.uid, None)
        self._wake.pop(ref.uid, None)
        for key in [k for k, uids in self._parents.items() if ref.uid in uids]:
            self._parents[key].discard(ref.uid)
            if not self._parents[key]:
                del self._parents[key]


@dataclass
class Run:
    status: TaskStatus  # its one writer: says whether the run holds the task and reached a verdict
    task: asyncio.Task = None  # type: ignore[assignment]  # set right after (the run refers to itself)
    deleting: bool = False  # a fleet's run stopped because its object is being deleted


class Supervisor:
    def __init__(self, engine: Engine, api_client: k8s.ApiClient, *, fleet: FleetSettings | None = None,
                 namespaces: list[str] | None = None, observatory: Observatory | None = None,
                 progress_interval: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 allow_file_urls: list[Path] | tuple[Path, ...] = (),
                 pull_requests: PullRequestSettings | None = None, rebase_rounds: int = rebase.DEFAULT_REBASE_ROUNDS):
        self.engine = engine
        # A queued result that conflicts with the base goes back to its task this many times
        # (kube/rebase.py); after that the task ends Conflict.
        self.rebase_rounds = rebase_rounds
        self.namespaces = namespaces or []  # watched; [] = all
        self.observatory = observatory or observatory_for(engine)
        self.secrets = SecretReader(api_client, (pull_requests.default_token_secret,) if pull_requests else ())
        # file:// only under the prefixes the administrator allows (--allow-file-urls).
        self.mirrors = RepositoryMirrors(engine.work_dir / "mirrors", RepositoryPolicy(engine.work_dir,
                                                                                       tuple(allow_file_urls)))
        self.limits = SpendLimits(api_client, self.observatory.spend, self.stop_namespace)
        # The PR publisher works under the task's claim (a fleet: one publisher per task).
        self.pull_requests = PullRequests(self.secrets, pull_requests, self.observatory,
                                          confirm=lambda ref: self.ownership.confirm(ref),
                                          release=lambda ref: self.ownership.release(ref),
                                          parents=lambda ref: self.dependencies.tasks.get(ref.namespace, {}))
        self.ownership: Ownership
        # Cells an earlier operator left running (--cells-outlive-operator), proven by their
        # private records (infra/cellrecords.py) before the startup sweep; taken by their runs.
        self.live_cells: dict[str, LiveCell] = {}
        if fleet is None:
            self.ownership = SingleReplica(self.reap, self.live_cells)
        else:
            self.ownership = FleetOwnership(api_client, fleet, self.reap, on_fenced=self._fenced,
                                            on_view=self._rescan, on_lost=self._lost, clock=clock)
            self.limits.replica = fleet.replica  # its own entry of each SpendLimit's status.replicas
        self.status = StatusWriter(api_client, (engine.confinement.enabled, engine.confinement.status.message),
                                   self.observatory.metrics, fence=self.ownership.fence)
        # The admission hook: every check a task waits on before it takes a slot.
        self.dependencies = DependencyCheck(self.observatory.views)
        self.admission: list[AdmissionCheck] = [SpendLimitCheck(self.limits), self.dependencies]
        self.custom = k8s.CustomObjectsApi(api_client)
        self.progress_interval = progress_interval
        self._runs: dict[str, Run] = {}
        self._controls: dict[str, tuple[TaskRef, TaskControl]] = {}  # running tasks' stop switches
        self._background: set[asyncio.Task] = set()
        self._adopting: set[str] = set()  # a fleet: finished tasks being claimed for their pull request
        self._stopping = False
        self.merge_queues: Any = None  # kube.mergequeues.MergeQueues, set by the operator's command

    # -- what the handlers call --

    async def start(self) -> None:
        """After the startup sweep, before the first task: the SpendLimits are read (no task
        starts past one), then a fleet replica joins (its Lease)."""
        await self.limits.load(self.namespaces)
        await self.limits.start()
        await self.ownership.start()

    async def admit(self, body: Any) -> None:
        """One replica: a new AgentTask."""
        if not AgentTaskStatus.of(body).finished and body["metadata"]["uid"] not in self._runs:
            self._take(body)

    async def resume(self, body: Any) -> None:
        """One replica: the operator (re)started and finds this object. A finished task is
        shown; an interrupted one is taken under the restart rules."""
        ref, status = TaskRef.from_body(body), AgentTaskStatus.of(body)
        if status.finished:
            self._remember_finished(ref, status)
            self._resume_pull_request(ref, body, status)
            self._rebase_if_due(body)
        elif ref.uid not in self._runs:
            self._take(body)

    def task_changed(self, event_type: str | None, body: dict) -> None:
        """One replica: any AgentTask changed (or went away): wakes the tasks that depend on
        it; a result the merge queue ejected for a textual conflict goes back to its task."""
        self.dependencies.saw(event_type, body)
        if event_type != "DELETED":
            self._rebase_if_due(body)

    def _rebase_if_due(self, body: dict) -> None:
        """One replica: the task's result was ejected for a textual conflict: take it for a
        rebase round (or its Conflict verdict). (A fleet does not yet: see docs/architecture.md.)"""
        if (self._stopping or self.ownership.claims or body["metadata"]["uid"] in self._runs
                or body["metadata"].get("deletionTimestamp")):
            return
        try:
            spec = AgentTaskSpec.model_validate(body.get("spec") or {})
        except ValueError:
            return
        if rebase.due(spec, AgentTaskStatus.of(body)):
            self._take(body)

    async def cells_to_keep(self) -> frozenset[str]:
        """Before the startup sweep: the cells of the watched tasks that will be reopened in
        their sessions (one replica only). The listing also seeds the view of the tasks
        that dependents decide on."""
        bodies: list[dict] = []
        try:
            for namespace in self.namespaces or [None]:
                if namespace is None:
                    listed = await asyncio.to_thread(self.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL)
                else:
                    listed = await asyncio.to_thread(self.custom.list_namespaced_custom_object, GROUP, VERSION,
                                                     namespace, PLURAL)
                bodies += listed.get("items") or []
        except Exception as exc:  # noqa: BLE001 - then nothing is kept: interrupted tasks run again from the start
            log.warning("cannot list the tasks to resume (%s): interrupted tasks will run again from the start", exc)
            return frozenset()
        for body in bodies:
            self.dependencies.saw(None, body)
        if self.ownership.claims:  # a fleet reopens nothing (a lost replica's cell lived in its pod)
            return frozenset()
        keep = resumable_cells(bodies)
        for cell_id in keep:
            record = self.engine.records.read(cell_id)
            live = await asyncio.to_thread(verify, record, self.engine.work_dir) if record is not None else None
            if live is not None:
                self.live_cells[cell_id] = live
        return keep

    def running_cells(self) -> frozenset[str]:
        """The cells the startup sweep must leave running: those to reattach to."""
        return frozenset(self.live_cells)

    def observe(self, event_type: str | None, body: dict) -> None:
        """A fleet: every change of every task (kopf's on.event, on every replica)."""
        ref = TaskRef.from_body(body)
        self.dependencies.saw(event_type, body)
        run = self._runs.get(ref.uid)
        if event_type == "DELETED":
            self.ownership.known.pop(ref.uid, None)
            self.pull_requests.forget(ref)
            if run is not None:
                run.task.cancel()  # gone: stop at once (its teardown needs nothing of the object)
            self.observatory.forget(ref.namespace, ref.name)
            return
        self.ownership.known[ref.uid] = body
        status = AgentTaskStatus.of(body)
        if status.finished and run is None:  # finished here or elsewhere: on the page
            self._remember_finished(ref, status)
        if body["metadata"].get("deletionTimestamp") and run is not None and run.status.claimed and not run.deleting:
            # Deleted while it runs here: stop at once and give the claim up, so whichever
            # replica's on.delete comes next may let the object go.
            run.deleting = True
            run.task.cancel()
        self._consider(body)

    async def stop(self, body: Any) -> str | None:
        """The object is being deleted: stop its run at once and leave nothing behind. (A
        push already begun ends first and its verdict is written: see run_task.) Returns why
        the deletion must wait (a fleet: another replica still runs the cell), else None."""
        ref, status = TaskRef.from_body(body), AgentTaskStatus.of(body)
        run = self._runs.get(ref.uid)
        self.pull_requests.forget(ref)
        if run is not None:
            run.task.cancel()
            await asyncio.wait([run.task])  # the run tears its cell down before it ends
        elsewhere = self.ownership.held_elsewhere(status)
        if elsewhere is not None:  # nothing of ours to reap: the cell lived in another replica's pod
            replica, live = elsewhere
            # A finished task has no cell any more (its final status is written after teardown).
            if not status.finished and live:
                return f"replica {replica} runs this task's cell; waiting for it to stop it"
            return None
        finished = run is not None and run.status.finished
        await self.reap(ref, status, False)
        await self._forget_result(body, status)
        self.observatory.forget(ref.namespace, ref.name)  # its transcript goes with it
        if not status.finished and not finished:
            phase = status.phase.value if status.phase else "Pending"
            await self.status.event(ref, Reason.CANCELLED.value,
                                    f"deleted during {phase}: stopped; its cell was removed", warning=True)
        return None

    async def shutdown(self) -> None:
        """Operator stopping: stop every cell; the tasks go back to Pending, unclaimed, and run
        again on the next start or on another replica (a task already pushing finishes its
        push and reports it)."""
        self._stopping = True
        runs = [run.task for run in self._runs.values()]
        for run in runs:
            run.cancel()
        if runs:
            await asyncio.wait(runs)
        await self.pull_requests.stop()  # a PR not yet opened is opened on the next start
        await self.limits.stop()  # the last spend counts are written
        await self.ownership.stop()

    # -- taking a task --

    def _consider(self, body: dict) -> None:
        """A fleet: take a task nobody live holds; drop a wait for one somebody else took."""
        if self._stopping or not self.ownership.active():
            return
        run = self._runs.get(body["metadata"]["uid"])
        if run is not None:
            if not run.status.claimed and not self.ownership.ours(body) and not self.ownership.may_take(body):
                run.task.cancel()  # it waited here for a slot, but someone else took it (or it ended)
            return
        if self.ownership.may_take(body):
            self._take(body)
        else:
            self._adopt_pull_request(body)

    def _adopt_pull_request(self, body: dict) -> None:
        """A fleet: a finished task whose PR work is left (not recorded at its commit, or open)
        and whose claim died with its replica is claimed again, then its PR is taken up here.
        Of several replicas trying, the claim lets one through: the forge does not serialise
        creates, so two publishers could open two PRs."""
        if ((body.get("spec") or {}).get("result") or {}).get("kind") != "pullRequest":
            return
        ref = TaskRef.from_body(body)
        if ref.uid in self._adopting or self.pull_requests.busy(ref.uid) or not self.ownership.may_adopt(body):
            return
        try:
            spec = AgentTaskSpec.model_validate(body["spec"])
        except ValueError:
            return
        if not pull_request_work(spec, AgentTaskStatus.of(body)):
            return
        self._adopting.add(ref.uid)
        self._spawn(self._claim_pull_request(ref, spec, body))

    async def _claim_pull_request(self, ref: TaskRef, spec: AgentTaskSpec, seen: dict) -> None:
        try:
            status = TaskStatus(self.status, ref, seen["metadata"].get("generation"), claimed=False)
            body = await self.ownership.claim_finished(ref, status.claim)
            if body is None:
                return  # another replica has it, or it went away
            if self._stopping:  # (the Lease goes with the operator: another replica takes it up)
                self.ownership.release(ref)
                return
            log.info("%s: claimed to take up its pull request", ref)
            found = AgentTaskStatus.of(body)
            status.phase, status.conditions = found.phase, found.conditions_as_written()
            self.pull_requests.resume(ref, spec, status, found)
        except Exception:  # noqa: BLE001 - the next look at the Leases tries again
            log.exception("%s: cannot take up its pull request", ref)
            self.ownership.release(ref)
        finally:
            self._adopting.discard(ref.uid)

    async def _rescan(self) -> None:
        """A fleet, after each look at the Leases: a replica may have died (its tasks are claimable now)."""
        for body in list(self.ownership.known.values()):
            self._consider(body)

    def _take(self, body: Any) -> None:
        ref = TaskRef.from_body(body)
        status = TaskStatus(self.status, ref, body["metadata"].get("generation"), claimed=not self.ownership.claims,
                            unclaimed=lambda: self.ownership.unclaimed(ref))
        run = Run(status)
        run.task = asyncio.create_task(self._run(ref, body, run), name=f"agenttask {ref}")
        self._runs[ref.uid] = run
        run.task.add_done_callback(lambda _: self._runs.pop(ref.uid, None) if self._runs.get(ref.uid) is run else None)

    async def _run(self, ref: TaskRef, body: dict, run: Run) -> None:
        """The run's one exit: every way it ends is written through ``run.status``."""
        status = run.status
        try:
            if self.ownership.claims:
                # A replica claims a task only once it holds a slot for it: the oldest waiting
                # task is the next one claimed anywhere, and a claim is never left idle.
                await self._in_slot(ref, body, status, lambda: self._claim_and_run(ref, status))
            else:
                current = AgentTaskStatus.of(body)
                if current.finished:  # taken back for the merge queue (kube/rebase.py)
                    await self._rebase(ref, body, status, current)
                    return
                plan = await self.ownership.plan(ref, current, _resume_mode(body))
                await self._carry_out(ref, body, status, plan, holding_slot=False)
        except asyncio.CancelledError:
            if self._stopping:
                with contextlib.suppress(ClaimLost):
                    await status.requeue(Reason.OPERATOR_SHUTDOWN, "operator stopped; the task runs again when it restarts")
            elif run.deleting:
                with contextlib.suppress(Exception):  # the cell is gone: nothing left to wait for
                    await status.release()
            raise
        except ClaimLost as exc:
            log.warning("%s: %s; stopped without writing", ref, exc)
        except Exception as exc:  # a bug must end the task visibly, not leave it hanging
            log.exception("%s: internal error", ref)
            if status.claimed:
                try:
                    self._observed(status)
                    await status.finish(TaskResult(task_id=ref.name, outcome=Outcome.FAILED,
                                                   reason=Reason.INTERNAL_ERROR,
                                                   message=f"internal error: {type(exc).__name__}: {exc}"))
                except Exception:  # e.g. the status write itself was forbidden: logged by the writer
                    log.exception("%s: cannot record the internal error", ref)
        finally:
            self.dependencies.forget(ref)
            if not self.pull_requests.busy(ref.uid):  # (else the claim goes when its PR work ends)
                self.ownership.release(ref)

    async def _claim_and_run(self, ref: TaskRef, status: TaskStatus) -> None:
        body = await self.ownership.claim(ref, status.claim)
        if body is None:
            return  # another replica has it, or it ended or went away meanwhile
        plan = await self.ownership.plan(ref, AgentTaskStatus.of(body), _resume_mode(body))
        await self._carry_out(ref, body, status, plan, holding_slot=True)

    async def _rebase(self, ref: TaskRef, body: dict, status: TaskStatus, current: AgentTaskStatus) -> None:
        """A finished task whose result the merge queue ejected for a textual conflict: the
        next rebase round, or the Conflict verdict after the last one."""
        decided = rebase.next_round(current, self.rebase_rounds)
        if isinstance(decided, str):
            await status.conflict(decided)
            self._observed(status)  # counted and shown as any verdict; its transcript ends with it
            status.observation.finish(TaskResult(task_id=ref.name, outcome=Outcome.FAILED, reason=Reason.CONFLICT,
                                                 message=decided, commit=current.commit))
            return
        await status.rebase_round(decided.number, (
            f"rebase round {decided.number} of {self.rebase_rounds}: the result conflicts with "
            f"{decided.onto[:12]} in {', '.join(decided.paths) or 'the tree'}; a cell reopens on it"))
        await self._carry_out(ref, body, status, Plan(attempt=1), holding_slot=False, fresh_round=decided)

    async def _carry_out(self, ref: TaskRef, body: dict, status: TaskStatus, plan: Plan, holding_slot: bool,
                         fresh_round: rebase.RebaseRound | None = None) -> None:
        """The task is ours: carry the restart rules' plan out. ``fresh_round``: a rebase
        round starting now (one interrupted by a restart is found in the status)."""
        try:
            await self._carry_out_plan(ref, body, status, plan, holding_slot, fresh_round)
        finally:
            live = plan.reattach
            if live is not None and not live.taken:  # ended before its run took the running cell over
                await uncancellable(kill_live(live, self.engine.settings.stop_grace, self.engine.work_dir))
                self.engine.records.remove(live.record.cell_id)

    async def _carry_out_plan(self, ref: TaskRef, body: dict, status: TaskStatus, plan: Plan, holding_slot: bool,
                              fresh_round: rebase.RebaseRound | None = None) -> None:
        previous = AgentTaskStatus.of(body)
        rebase_round = fresh_round or rebase.interrupted_round(previous)
        status.attempt = plan.attempt
        if plan.give_up is not None:
            self._observed(status)
            await status.finish(TaskResult(task_id=ref.name, outcome=Outcome.FAILED, reason=Reason.OPERATOR_RESTARTED,
                                           message=plan.give_up))
            return
        if plan.retrying is not None:
            await self.status.event(ref, "Retrying", plan.retrying, warning=True)
        # The task's budget covers all its attempts and rounds (and what a reattached cell spent before).
        if plan.attempt > 1 or plan.resume_commit is not None or rebase_round is not None or plan.reattach is not None:
            status.previous_progress = previous.progress
        if plan.resume_commit is not None and previous.result is not None:
            status.previous_result = previous.result.as_written()  # files, test exit code of the first run
        spec = AgentTaskSpec.model_validate(body["spec"])
        try:
            secrets = await self.secrets.for_task(ref, spec)
            origin = self.ownership.origin(ref, MirrorOrigin(self.mirrors, ref.namespace, spec.repository.url,
                                                             secrets.git, pushes=spec.repository.push))
        except (ConfigurationError, RepositoryRefused) as exc:
            reason = Reason.REPOSITORY_REFUSED if isinstance(exc, RepositoryRefused) else Reason.INVALID_INPUT
            self._observed(status)
            await status.finish(TaskResult(task_id=spec.task_id or ref.name, outcome=Outcome.FAILED,
                                           reason=reason, message=str(exc)))
            return
        status.reopen_session, status.reattach = plan.reopen_session, plan.reattach
        confined, message = self.status.confinement  # said on every task: never a silent downgrade
        await self.status.event(ref, "Confined" if confined else "Unconfined", message, warning=not confined)

        async def execute() -> None:
            landed = await self._landed(ref, spec, origin, plan, previous)
            if landed is not None:  # the lost run's push landed before its verdict: that is the result
                if previous.result is not None:
                    status.previous_result = previous.result.as_written()
                task = spec.to_task_spec(ref, origin.path, secrets.env, parse_time(previous.start_time))
                await self._execute(ref, spec, task, secrets, status, origin, landed)
                return
            start_commits: list[str] = []
            # (A resumed push, a reopened session or a rebase round built on its parents already.)
            decision = (None if plan.resume_commit is not None or rebase_round is not None
                        else self.dependencies.decision(ref, body))
            if decision is not None and decision.verdict is Verdict.FAIL:
                self._observed(status)
                await status.finish(TaskResult(task_id=spec.task_id or ref.name, outcome=Outcome.FAILED,
                                               reason=Reason.DEPENDENCY_FAILED, message=decision.message))
                return
            if decision is not None and decision.verdict is Verdict.START:
                await status.dependencies_met(self.dependencies.parents(ref), decision.message)
                start_commits = list(decision.start_commits)
            resumed_from = await self._green_commit(ref, origin, plan)
            if resumed_from is not None and plan.green_start is not None:
                start_commits = [plan.green_start]  # the lost run's start (its parents' results already)
            started = None if fresh_round is not None else parse_time(previous.start_time)  # a round's own box
            task = spec.to_task_spec(ref, origin.path, secrets.env, started, start_commits)
            task.resumed_from = resumed_from
            if rebase_round is not None:
                task = rebase_round.task(task)
            await self._execute(ref, spec, task, secrets, status, origin, plan.resume_commit)

        if holding_slot or plan.resume_commit is not None:  # (a resumed push needs no cell)
            await execute()
        else:
            await self._in_slot(ref, body, status, execute)

    async def _landed(self, ref: TaskRef, spec: AgentTaskSpec, origin: MirrorOrigin, plan: Plan,
                      previous: AgentTaskStatus) -> str | None:
        """A fleet adopting a task lost while Pushing: the commit its status recorded, when the
        repository's result branch holds exactly it (the push landed, the verdict was not
        written). The adopter then resumes at the push, which finds it there: pushed once."""
        if plan.green_start is None or previous.phase is not Phase.PUSHING or not previous.commit:
            return None
        branch = spec.result_branch or f"reactor/{ref.name}"
        try:
            await origin.fetch()  # (this replica may not have a mirror of the repository yet)
            head = await origin.head(branch)
        except Exception as exc:  # noqa: BLE001 - then the record decides (a push that landed fails there)
            log.warning("%s: cannot read %s in the repository: %s", ref, branch, exc)
            return None
        if head != previous.commit:
            return None
        origin.green_known = True  # the lost run's record goes with the verdict
        return head

    async def _green_commit(self, ref: TaskRef, origin: MirrorOrigin, plan: Plan) -> str | None:
        """A fleet adopting a lost replica's task: the green commit that run recorded in the
        repository, when it descends from the commit that run started from (else None: the
        task runs from the start). Said in an Event."""
        if plan.green_start is None:
            return None
        try:
            green = await origin.find_green(plan.green_start)
        except Exception as exc:  # noqa: BLE001 - IG: without the record the task runs from the start
            log.warning("%s: cannot look for the lost run's green commit: %s", ref, exc)
            green = None
        if green is not None:
            await self.status.event(ref, "Resuming", f"starting from {green[:12]}, the tested commit the lost run "
                                    f"recorded (on {plan.green_start[:12]}), in a fresh session")
        else:
            log.info("%s: no usable green commit recorded by the lost run; running from the start", ref)
        return green

    async def _in_slot(self, ref: TaskRef, body: dict, status: TaskStatus, work: Callable[[], Awaitable[None]]) -> None:
        """Admission, then a capacity slot (oldest task first), then ``work``."""
        gate, priority = self.engine.capacity, (ref.creation, ref.namespace, ref.name)
        while True:
            await self._admit(ref, body, status.waiting)
            async with gate.slot(priority, on_reason=status.waiting):
                if self._held_back(ref, _latest(self.ownership, ref, body)) is not None:
                    continue  # held back while this task waited for a slot: hand the slot on
                await work()
            return

    # -- admission --

    async def _admit(self, ref: TaskRef, body: dict, say: WaitingCallback) -> None:
        """The admission hook: hold the task in Pending, saying why, while any check of
        ``self.admission`` holds it back."""
        said = None
        while (held := self._held_back(ref, _latest(self.ownership, ref, body))) is not None:
            check, why = held
            if why != said:
                await say(why[0], why[1], **(why[2] if len(why) > 2 else {}))  # type: ignore[misc]
                view = self.observatory.views.view(ref.namespace, ref.name)
                view.reason, view.message = why[0].value, why[1]
                said = why
            await check.changed(ref)

    def _held_back(self, ref: TaskRef, body: dict) -> tuple[AdmissionCheck, Held] | None:
        for check in self.admission:
            why = check.blocked(ref, body)
            if why is not None:
                return check, why
        return None

    # -- running --

    async def _execute(self, ref: TaskRef, spec: AgentTaskSpec, task: TaskSpec, secrets: TaskSecrets,
                       status: TaskStatus, origin: MirrorOrigin, resume_commit: str | None) -> None:
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

        async def on_phase(event: PhaseEvent) -> None:
            if event.phase.terminal and event.result is not None and event.result.pushed:
                try:
                    await self.after_push(ref, spec, secrets, event.result, status)
                except Exception:  # noqa: BLE001 - the verdict is written whatever happens here
                    log.exception("%s: after the push", ref)
            await status.report(event)
            if event.phase.terminal:  # the task ended: its green record (a fleet's) goes
                await ignore_and_warn(f"{ref}: delete the green record", origin.forget_green, None)
            if event.phase.terminal and status.final is not None:
                # The pull request (kube/pullrequests.py) is opened in the background once the
                # verdict is written: no slot held, and the verdict stands whatever the forge says.
                self.pull_requests.after_run(ref, spec, status, AgentTaskStatus.read(status.final))

        self._controls[ref.uid] = (ref, control)
        try:
            await run_task(task, self.engine, on_phase, cell_id=ref.cell_id,
                           priority=(ref.creation, ref.namespace, ref.name), origin=origin,
                           resume_commit=resume_commit, take_capacity=False, control=control, watchers=[watch],
                           reopen_session=status.reopen_session, reattach=status.reattach)
        finally:
            self._controls.pop(ref.uid, None)
            if publisher is not None:
                await publisher.stop()

    async def after_push(self, ref: TaskRef, spec: AgentTaskSpec, secrets: TaskSecrets, result: TaskResult,
                         status: TaskStatus) -> None:
        """The place after a successful push: the commit is on the task's origin
        (``result.pushed``), the cell is gone, and the verdict is not written yet, so what is
        recorded here (through a TaskStatus method) lands before it. Runs uncancellable, like
        the push; an exception is logged and the verdict written anyway.

        A result with ``spec.integrate: queue`` enters its branch's MergeQueue here."""
        if spec.integrate == "queue" and self.merge_queues is not None:
            await self.merge_queues.submit(ref, spec)

    def _observed(self, status: TaskStatus) -> None:
        """A verdict reached without a run (a missing Secret, a bug) is counted and shown too."""
        if status.observation is None:
            status.observation = self.observatory.observe(status.ref.namespace, status.ref.name, TaskControl())

    def stop_namespace(self, namespace: str, message: str) -> None:
        """A SpendLimit of ``namespace`` was crossed: stop every task running there."""
        for ref, control in list(self._controls.values()):
            if ref.namespace == namespace:
                control.stop(Reason.SPEND_LIMIT_EXCEEDED, message)

    def _remember_finished(self, ref: TaskRef, status: AgentTaskStatus) -> None:
        """A finished task found at start-up (or finished by another replica): shown on the
        page and counted by phase."""
        view = self.observatory.views.view(ref.namespace, ref.name)
        view.phase, view.message = status.phase.value if status.phase else "", status.message or ""
        view.reason = status.reason or ""
        view.created = ref.creation or view.created
        view.started, view.finished = status.start_time, status.completion_time
        view.cost = status.usage.cost if status.usage else 0.0
        view.tokens = status.usage.total_tokens if status.usage else 0
        view.files = list(status.result.files_changed) if status.result else []
        view.commit = status.commit
        if status.pull_request is not None:
            view.pull_request, view.pull_request_state = status.pull_request.url, status.pull_request.state

    def _resume_pull_request(self, ref: TaskRef, body: dict, status: AgentTaskStatus) -> None:
        """One replica, at start-up: a finished task whose PR is not recorded at its pushed
        commit (the operator died between the push and the PR) is published now; an open one
        is followed. (A fleet claims the task first: ``_adopt_pull_request``.)"""
        finished = TaskStatus(self.status, ref, body["metadata"].get("generation"), status.attempts)
        finished.phase, finished.conditions = status.phase, status.conditions_as_written()
        self.pull_requests.resume(ref, AgentTaskSpec.model_validate(body["spec"]), finished, status)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- a fleet: fencing, claims lost --

    async def _fenced(self) -> None:
        """Our Lease may be about to expire for the others: kill our cells now (they must be
        gone before another replica may start the same tasks), then drop the runs; their
        teardown removes the worktrees. No status write: the claims are not ours any more."""
        owner = self.engine.owner.token
        for process in await asyncio.to_thread(find_marked_processes, str(self.engine.work_dir)):
            if process.owner == owner:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
        runs = [run.task for run in self._runs.values() if run.status.claimed]
        for run in runs:
            run.cancel()
        if runs:
            await asyncio.wait(runs)
        await self.pull_requests.stop()  # held under claims that are void now: taken up again once claimed

    def _lost(self, ref: TaskRef) -> None:
        """The API server says the task is someone else's now: drop our run of it (and its PR work)."""
        self.pull_requests.forget(ref)
        run = self._runs.get(ref.uid)
        if run is not None and run.task is not asyncio.current_task():
            run.task.cancel()

    # -- orphans --

    async def reap(self, ref: TaskRef, status: AgentTaskStatus, keep_results: bool, keep_cell: bool = False) -> list[str]:
        """Kill a cell's server recorded in status (only if it still carries this cell's
        marker: the PID may have been reused) and remove its worktree. A result branch that
        holds a commit is kept when ``keep_results`` (its head is returned), else deleted.
        ``keep_cell``: only the server goes (its checkout and state dir are reopened)."""
        cell = status.cell
        cell_id = (cell.cell_id if cell else None) or ref.cell_id
        live = self.live_cells.pop(cell_id, None)  # left running for a run that will not come (deleted)
        if live is not None:
            await kill_live(live, self.engine.settings.stop_grace, self.engine.work_dir)
        pid = cell.server_pid if cell else None
        if pid and is_marked_for(pid, cell_id):
            log.warning("%s: killing orphaned server pid %s", ref, pid)
            await asyncio.to_thread(kill_process_group, pid)
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

    async def _forget_result(self, body: Any, status: AgentTaskStatus) -> None:
        """A deleted task's unpushed commit (its push failed) goes with it: the mirror is the
        operator's, not the user's."""
        result = status.result
        if result is None or not result.branch or not result.commit or result.pushed:
            return
        mirror = self.mirrors.path_for(body["metadata"]["namespace"], AgentTaskSpec.model_validate(body["spec"]).repository.url)
        if mirror.exists() and await self._head(mirror, result.branch) == result.commit:
            await asyncio.to_thread(self.mirrors.delete_branch, mirror, result.branch)

    @staticmethod
    async def _head(repo: Any, branch: str) -> str:
        return await asyncio.to_thread(git, repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}",
                                       check=False)


def resumable_cells(bodies: list[dict]) -> frozenset[str]:
    """Cells the startup sweep must leave (checkout and state dir): those of the tasks that
    will be reopened in their sessions (ownership.reopen_session), unless being deleted."""
    cells = set()
    for body in bodies:
        status = AgentTaskStatus.of(body)
        if reopen_session(status, _resume_mode(body)) is not None and not body["metadata"].get("deletionTimestamp"):
            cells.add((status.cell.cell_id if status.cell is not None else None) or TaskRef.from_body(body).cell_id)
    return frozenset(cells)


def _resume_mode(body: dict) -> str:
    """spec.resume (reattach unless the spec says restart; the CRD holds it to those two)."""
    return (body.get("spec") or {}).get("resume") or "reattach"


def _latest(ownership: Ownership, ref: TaskRef, body: dict) -> dict:
    """The task as last seen (a fleet's view is kept current by its events), for admission."""
    return ownership.known.get(ref.uid, body)


def _spent_before(progress: ProgressStatus | None) -> Spend | None:
    """What an interrupted earlier attempt had spent (its last progress): the task's budget
    covers all its attempts."""
    if progress is None:
        return None
    inp, out = progress.input_tokens, progress.output_tokens
    other = max(0, progress.total_tokens - inp - out)
    return Spend(TokenUsage(input_tokens=inp, output_tokens=out, cache_read_tokens=other), progress.cost,
                 progress.steps)
