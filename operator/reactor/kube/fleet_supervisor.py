"""The supervisor of one replica among many (``reactor operator --fleet``).

A thin layer over :class:`TaskSupervisor`: every replica knows every task (kopf's on.event),
waits for a free slot of its own (agents and memory, oldest task first), then asks the fleet
for the claim; only the holder runs the cell, writes status (fenced on the API server) and
pushes (after re-reading its claim). When the fleet fences this replica, its cells are killed
at once and its runs dropped without another write. When another replica's Lease expires,
its tasks become claimable here, under the rules of an operator restart: a task interrupted
mid-run is run again (``status.attempts`` < 2), else it fails with OperatorRestarted. (An
adopted task runs from the start: a commit the lost replica had not pushed lived in its
own volume.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

from kubernetes import client as k8s

from reactor.infra.processes import find_marked_processes
from reactor.kube.fleet import ClaimLost, Fleet, FleetSettings
from reactor.kube.resource import AgentTaskSpec, TaskRef, parse_time
from reactor.kube.status import StatusWriter, TaskStatus, now, phase_status
from reactor.kube.supervisor import MAX_ATTEMPTS, TERMINAL, TaskSupervisor, _Run
from reactor.workflow.engine import Engine
from reactor.workflow.origin import MirrorOrigin, PushFailed
from reactor.workflow.types import Phase, Reason

log = logging.getLogger(__name__)


class FencedStatusWriter(StatusWriter):
    """Status writes of a claim holder: refused by the API server once the task is not ours
    (see Fleet.patch_status); a refusal stops our run of it. Events only while we hold it."""

    def __init__(self, api_client: k8s.ApiClient, confinement: tuple[bool, str], metrics: Any, fleet: Fleet, on_lost):
        super().__init__(api_client, confinement, metrics)
        self.fleet, self.on_lost = fleet, on_lost

    async def _send(self, ref: TaskRef, status: dict[str, Any]) -> None:
        try:
            await self.fleet.patch_status(ref, status)
        except ClaimLost:
            self.on_lost(ref)
            raise

    async def event(self, ref: TaskRef, reason: str, message: str, warning: bool = False) -> None:
        if self.fleet.holds(ref):
            await super().event(ref, reason, message, warning)


class _UnclaimedDependencies:
    """How a task nobody holds says it waits for its dependencies (the TaskStatus calls that
    TaskSupervisor.wait_for_dependencies makes): written onto the version read, so a claim
    made meanwhile is never overwritten (Fleet.write_unclaimed)."""

    def __init__(self, supervisor: FleetTaskSupervisor, ref: TaskRef):
        self.supervisor, self.ref = supervisor, ref
        status = (supervisor.known.get(ref.uid) or {}).get("status") or {}
        self.seen_parents = {d["name"]: d.get("uid") or "" for d in status.get("dependencies") or []
                             if isinstance(d, dict) and d.get("name")}

    async def waiting(self, reason: Reason, message: str, **detail: Any) -> None:
        body = self.supervisor.known.get(self.ref.uid)
        if body is None:
            return
        status = body.get("status") or {}
        current = next((c.get("reason") for c in status.get("conditions") or [] if c.get("type") == "Succeeded"), None)
        if status.get("phase") not in (None, Phase.PENDING.value) or (
                current == reason.value and status.get("waitingOn") == detail.get("waitingOn")):
            return
        pending = phase_status(Phase.PENDING, message, body["metadata"].get("generation"), reason.value)
        await self.supervisor.fleet.write_unclaimed(self.ref, body, {**pending, **detail})

    async def dependencies_met(self, dependencies: list[dict[str, Any]], message: str) -> None:
        """Written by the claim holder's run, which decides again."""


class FleetTaskStatus(TaskStatus):
    async def requeue(self, reason: Reason, message: str) -> None:
        """Back to Pending *and unclaimed* (the replica stops): another replica takes it now."""
        if self.finished:
            return
        status = phase_status(Phase.PENDING, message, self.generation, reason.value)
        status.update(cell=None, claim=None)
        self.phase = Phase.PENDING
        await self.writer.patch(self.ref, status)


class FleetOrigin(MirrorOrigin):
    """Pushes only while the task is still ours: re-read right before the push."""

    def __init__(self, *args: Any, confirm, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.confirm = confirm

    async def push(self, branch: str, commit: str) -> None:
        if not await self.confirm():
            raise PushFailed("this replica no longer holds the task (another replica took it over); nothing pushed")
        await super().push(branch, commit)


class FleetSupervisor(TaskSupervisor):
    def __init__(self, engine: Engine, api_client: k8s.ApiClient, settings: FleetSettings, **kwargs: Any):
        super().__init__(engine, api_client, **kwargs)
        self.fleet = Fleet(api_client, settings, on_fenced=self._fenced, on_view=self._rescan)
        self.limits.replica = settings.replica  # its own entry of each SpendLimit's status.replicas
        self.status = FencedStatusWriter(api_client, self.status.confinement, self.observatory.metrics, self.fleet,
                                         on_lost=self._lost)
        self.known: dict[str, dict] = {}  # every task of the watched namespaces, as last seen
        self._holding: set[str] = set()  # uids whose run holds a claim (the others wait for a slot)
        self._deleting: set[str] = set()  # held runs stopped because their object is being deleted

    async def start(self) -> None:
        await super().start()
        await self.fleet.start()

    async def resumable_cells(self) -> frozenset[str]:
        """A replica keeps no cell for reopening: an adopter runs the task again (see the
        module doc), and a cell kept here might never be claimed here again."""
        return frozenset()

    # -- what every replica sees --

    async def admit(self, body: Any) -> None:
        self.observe(None, body)

    async def resume(self, body: Any) -> None:
        self.observe(None, body)

    def observe(self, event_type: str | None, body: dict) -> None:
        uid = body["metadata"]["uid"]
        run = self._runs.get(uid)
        if event_type == "DELETED":
            self.known.pop(uid, None)
            if run is not None:
                run.task.cancel()  # gone: stop at once (its teardown needs nothing of the object)
            self.observatory.forget(body["metadata"]["namespace"], body["metadata"]["name"])
            return
        self.known[uid] = body
        status = body.get("status") or {}
        if status.get("phase") in TERMINAL and run is None:  # finished here or elsewhere: on the page
            self._remember_finished(TaskRef.from_body(body), status)
        if body["metadata"].get("deletionTimestamp") and uid in self._holding and uid not in self._deleting:
            # Deleted while it runs here: stop at once and give the claim up, so whichever
            # replica's on.delete comes next may let the object go.
            self._deleting.add(uid)
            run.task.cancel()
        self._consider(body)

    async def _rescan(self) -> None:
        """After each look at the Leases: a replica may have died (its tasks are claimable now)."""
        for body in list(self.known.values()):
            self._consider(body)

    def _consider(self, body: dict) -> None:
        uid = body["metadata"]["uid"]
        if self._stopping or not self.fleet.holds_lease():
            return
        run = self._runs.get(uid)
        if run is not None:
            # Our own claim may be seen before the run that made it resumes: not a reason to stop.
            ours = ((body.get("status") or {}).get("claim") or {}).get("holder") == self.fleet.holder
            if uid not in self._holding and not ours and not self.fleet.claimable(body):
                run.task.cancel()  # it waited here for a slot, but someone else took it (or it ended)
            return
        if self.fleet.claimable(body):
            self._start(body, attempt=0)

    # -- running --

    def _start(self, body: Any, attempt: int, resume_commit: str | None = None,
               previous_result: dict | None = None) -> None:
        ref = TaskRef.from_body(body)
        placeholder = FleetTaskStatus(self.status, ref, body["metadata"].get("generation"), attempt)
        task = asyncio.create_task(self._run_claimed(ref), name=f"agenttask {ref}")
        run = self._runs[ref.uid] = _Run(task, placeholder)
        task.add_done_callback(lambda _: self._runs.pop(ref.uid, None) if self._runs.get(ref.uid) is run else None)

    async def _run_claimed(self, ref: TaskRef) -> None:
        """Wait for a slot here, claim, run. Only a holder writes (through the fenced writer)."""
        gate = self.engine.capacity
        try:
            body = self.known.get(ref.uid)
            spec = AgentTaskSpec.model_validate(body["spec"]) if body is not None else None
            if spec is not None and spec.depends_on:
                # Before the slot and the claim: a task waiting on others holds neither (the run
                # decides again once claimed, and writes a failure or the commits it starts at).
                await self.wait_for_dependencies(ref, spec, _UnclaimedDependencies(self, ref))
            while True:
                await self.wait_for_spend_limit(ref, lambda *reason: self._waiting(ref, *reason))
                async with gate.slot((ref.creation, ref.namespace, ref.name), on_reason=lambda *r: self._waiting(ref, *r)):
                    if self.limits.blocked(ref.namespace):
                        continue  # crossed while this task waited for a slot: hand it on, claim nothing
                    claimed = await self.fleet.claim(ref, self._first_status)
                    if claimed is None:
                        return  # another replica has it, or it ended or went away meanwhile
                    self._holding.add(ref.uid)
                    body, first = claimed
                    previous = body.get("status") or {}
                    status = FleetTaskStatus(self.status, ref, body["metadata"].get("generation"),
                                             int(first.get("attempts") or previous.get("attempts") or 0))
                    self._runs[ref.uid].status = status
                    status.seen_parents = _UnclaimedDependencies(self, ref).seen_parents
                    if first["phase"] == Phase.FAILED.value:  # interrupted twice: the claim wrote the verdict
                        status.phase = Phase.FAILED
                        await self.status.event(ref, "Failed", first["message"], warning=True)
                        return
                    if previous.get("phase") not in (None, Phase.PENDING.value):
                        if (previous.get("claim") or {}).get("replica") == self.fleet.replica:
                            await self.reap(ref, previous, keep_results=False)  # our own earlier incarnation's cell
                        await self.status.event(ref, "Retrying", first["message"], warning=True)
                    await self._run(ref, body["spec"], status, parse_time(first.get("startTime")), None,
                                    take_capacity=False)
                return
        except ClaimLost as exc:
            log.warning("%s: %s; stopped without writing", ref, exc)
        except Exception:  # a bug: logged (the run itself writes its own failures)
            log.exception("%s: internal error around the claim", ref)
        except asyncio.CancelledError:
            if ref.uid in self._deleting and self.fleet.holds(ref):
                with contextlib.suppress(Exception):  # the cell is gone: nothing left to wait for
                    await self.fleet.patch_status(ref, {"cell": None, "claim": None})
            raise
        finally:
            self._holding.discard(ref.uid)
            self._deleting.discard(ref.uid)
            self.fleet.release(ref)

    def _first_status(self, body: dict) -> dict[str, Any] | None:
        """What the claim writes: Bootstrapping (attempt n+1), or Failed when an interrupted
        task has no attempts left. None: nothing to run."""
        status = body.get("status") or {}
        phase, attempts = status.get("phase"), int(status.get("attempts") or 0)
        generation = body["metadata"].get("generation")
        if phase in TERMINAL:
            return None
        if phase in (None, Phase.PENDING.value):  # new, or handed back by a replica that stopped
            first = phase_status(Phase.BOOTSTRAPPING, f"claimed by replica {self.fleet.replica}", generation)
            return {**first, "startTime": now(), "attempts": max(attempts, 1), "cell": None}
        lost = (status.get("claim") or {}).get("replica", "?")
        if attempts >= MAX_ATTEMPTS:
            message = f"replica {lost} was lost during {phase}; no attempts left"
            failed = phase_status(Phase.FAILED, message, generation, Reason.OPERATOR_RESTARTED.value)
            return {**failed, "cell": None, "completionTime": now()}
        message = f"replica {lost} was lost during {phase}; running again on {self.fleet.replica}"
        first = phase_status(Phase.BOOTSTRAPPING, message, generation, Reason.OPERATOR_RESTARTED.value)
        return {**first, "startTime": now(), "attempts": attempts + 1, "cell": None}

    async def _waiting(self, ref: TaskRef, reason: Reason, message: str) -> None:
        """A task nobody holds says why it waits (the first replica to say it wins; a claim
        made meanwhile is never overwritten: the write carries the version it saw)."""
        body = self.known.get(ref.uid)
        if body is None:
            return
        status = body.get("status") or {}
        current = next((c.get("reason") for c in status.get("conditions") or [] if c.get("type") == "Succeeded"), None)
        if status.get("phase") not in (None, Phase.PENDING.value) or current == reason.value:
            return
        pending = phase_status(Phase.PENDING, message, body["metadata"].get("generation"), reason.value)
        await self.fleet.write_unclaimed(ref, body, pending)

    def _origin(self, ref: TaskRef, spec: AgentTaskSpec, secrets: Any) -> MirrorOrigin:
        # The push must be over before our Lease could expire for others: a renewal interval
        # of margin, plus the third of the duration that fencing keeps in reserve.
        margin = self.fleet.settings.renew_interval
        return FleetOrigin(self.mirrors, spec.repository.url, secrets.git, pushes=spec.repository.push,
                           confirm=lambda: self.fleet.confirm(ref, margin=margin))

    def _lost(self, ref: TaskRef) -> None:
        """The API server says the task is someone else's now: drop our run of it."""
        run = self._runs.get(ref.uid)
        if run is not None and run.task is not asyncio.current_task():
            run.task.cancel()

    # -- fencing, deletion, shutdown --

    async def _fenced(self) -> None:
        """Our Lease may be about to expire for the others: kill our cells now (they must be
        gone before another replica may start the same tasks), then drop the runs; their
        teardown removes the worktrees. No status write: the claims are not ours any more."""
        owner = self.engine.owner.token
        for process in await asyncio.to_thread(find_marked_processes, str(self.engine.work_dir)):
            if process.owner == owner:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
        runs = [run.task for uid, run in self._runs.items() if uid in self._holding]
        for run in runs:
            run.cancel()
        if runs:
            await asyncio.wait(runs)

    async def stop(self, body: Any) -> str | None:
        ref = TaskRef.from_body(body)
        status = body.get("status") or {}
        claim = status.get("claim") or {}
        if claim.get("replica") and claim["replica"] != self.fleet.replica:
            run = self._runs.get(ref.uid)  # at most a waiter of ours
            if run is not None:
                run.task.cancel()
                await asyncio.wait([run.task])
            # A finished task has no cell any more (its final status is written after teardown).
            if status.get("phase") not in TERMINAL and self.fleet.claim_alive(claim):
                return f"replica {claim['replica']} runs this task's cell; waiting for it to stop it"
            return None  # nothing of ours to reap: the cell lived in another replica's pod
        return await super().stop(body)

    async def shutdown(self) -> None:
        await super().shutdown()  # cancels the runs; holders hand their tasks back (requeue)
        await self.fleet.stop()  # and the Lease goes, so nobody waits for it to expire
