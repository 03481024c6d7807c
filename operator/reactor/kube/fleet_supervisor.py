"""The supervisor of one replica among many (``reactor operator --fleet``).

A thin layer over :class:`TaskSupervisor`: every replica knows every task (kopf's on.event),
waits for a free slot of its own (agents and memory, oldest task first), then asks the fleet
for the claim; only the holder runs the cell, writes status (fenced on the API server) and
pushes (after re-reading its claim). When the fleet fences this replica, its cells are killed
at once and its runs dropped without another write. When another replica's Lease expires,
its tasks become claimable here, under the operator-restart rules: a task interrupted
mid-run is run once more (``status.attempts`` < 2), else it fails with OperatorRestarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from reactor.infra.processes import find_marked_processes
from reactor.kube.fleet import ClaimLost, Fleet, FleetSettings
from reactor.kube.resource import AgentTaskSpec, TaskRef
from reactor.kube.status import StatusWriter, _api_message, now, succeeded_condition
from reactor.kube.supervisor import MAX_ATTEMPTS, TERMINAL, TaskSupervisor
from reactor.workflow.engine import Engine
from reactor.workflow.types import Phase, Reason

log = logging.getLogger(__name__)


def _phase_status(phase: Phase, message: str, generation: int | None, reason: str | None = None,
                  **extra: Any) -> dict[str, Any]:
    condition = "Unknown" if not phase.terminal else ("True" if phase is Phase.SUCCEEDED else "False")
    return {"phase": phase.value, "message": message, "observedGeneration": generation,
            "conditions": [succeeded_condition(condition, reason or phase.value, message, generation)], **extra}


class FencedStatusWriter(StatusWriter):
    """Status writes of a claim holder: refused by the API server once the task is not ours
    (see Fleet.patch_status); a refusal stops our run of it. Events only while we hold it."""

    def __init__(self, api_client: k8s.ApiClient, fleet: Fleet, on_lost):
        super().__init__(api_client)
        self.fleet, self.on_lost = fleet, on_lost

    async def patch(self, ref: TaskRef, status: dict[str, Any]) -> bool:
        lock = self._locks.setdefault(ref.uid, asyncio.Lock())
        async with lock:
            try:
                return await self.fleet.patch_status(ref, status)
            except ClaimLost:
                self.on_lost(ref)
                raise
            except ApiException as exc:
                if exc.status == 403:
                    message = (f"RBAC: {_api_message(exc)}; grant `patch` on agenttasks/status in namespace "
                               f"{ref.namespace} (see manifests/rbac.yaml)")
                    log.error("%s: %s", ref, message)
                    raise PermissionError(message) from None
                raise

    async def event(self, ref: TaskRef, reason: str, message: str, warning: bool = False) -> None:
        if self.fleet.holds(ref):
            await super().event(ref, reason, message, warning)


class FleetSupervisor(TaskSupervisor):
    def __init__(self, engine: Engine, api_client: k8s.ApiClient, settings: FleetSettings):
        super().__init__(engine, api_client)
        self.fleet = Fleet(api_client, settings, on_fenced=self._fenced, on_view=self._rescan)
        self.status = FencedStatusWriter(api_client, self.fleet, on_lost=self._lost)
        self.known: dict[str, dict] = {}  # every task of the watched namespaces, as last seen
        self._holding: set[str] = set()  # uids whose run holds a claim (the others wait for a slot)
        self._deleting: set[str] = set()  # held runs stopped because their object is being deleted

    async def start(self) -> None:
        await self.fleet.start()

    # -- what every replica sees --

    async def admit(self, body: Any) -> None:
        self.observe(None, body)

    async def resume(self, body: Any) -> None:
        self.observe(None, body)

    def observe(self, event_type: str | None, body: dict) -> None:
        uid = body["metadata"]["uid"]
        if event_type == "DELETED":
            self.known.pop(uid, None)
            run = self._runs.get(uid)
            if run is not None:
                run.cancel()  # gone: stop at once (its teardown needs nothing of the object)
            return
        self.known[uid] = body
        if body["metadata"].get("deletionTimestamp") and uid in self._holding and uid not in self._deleting:
            # Deleted while it runs here: stop at once and give the claim up, so whichever
            # replica's on.delete comes next may let the object go.
            self._deleting.add(uid)
            self._runs[uid].cancel()
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
            if uid not in self._holding and not self.fleet.claimable(body):
                run.cancel()  # it waited here for a slot, but someone else took it (or it ended)
            return
        if self.fleet.claimable(body):
            self._start(body, attempt=0)

    # -- running --

    def _start(self, body: Any, attempt: int) -> None:
        ref = TaskRef.from_body(body)
        run = asyncio.create_task(self._run_claimed(ref), name=f"agenttask {ref}")
        self._runs[ref.uid] = run
        run.add_done_callback(lambda done: self._runs.pop(ref.uid, None) if self._runs.get(ref.uid) is done else None)

    async def _run_claimed(self, ref: TaskRef) -> None:
        gate = self.engine.capacity
        try:
            async with gate.slot((ref.creation, ref.namespace, ref.name), on_reason=lambda *r: self._waiting(ref, *r)):
                claimed = await self.fleet.claim(ref, self._first_status)
                if claimed is None:
                    return  # another replica has it, or it ended or went away meanwhile
                self._holding.add(ref.uid)
                body, first = claimed
                generation = body["metadata"].get("generation")
                if first["phase"] == Phase.FAILED.value:
                    await self.status.event(ref, "Failed", first["message"], warning=True)
                    return
                previous = body.get("status") or {}
                if previous.get("phase") not in (None, Phase.PENDING.value):
                    await self.status.event(ref, "Retrying", first["message"], warning=True)
                result, pushed = await self._execute(ref, AgentTaskSpec.model_validate(body["spec"]), generation,
                                                     first["attempts"])
            await self._finish(ref, result, pushed, generation)
        except asyncio.CancelledError:
            if self._stopping and self.fleet.holds(ref):
                # Hand the task back to the fleet (unclaimed, Pending): another replica takes it now.
                with contextlib.suppress(Exception):
                    await self.status.phase(ref, Phase.PENDING, "replica stopped; another replica runs the task",
                                            self._generation(ref), reason="OperatorShutdown", cell=None, claim=None)
            elif ref.uid in self._deleting and self.fleet.holds(ref):
                with contextlib.suppress(Exception):  # the cell is gone: nothing left to wait for
                    await self.fleet.patch_status(ref, {"cell": None, "claim": None})
            raise
        except ClaimLost as exc:
            log.warning("%s: %s; stopped without writing", ref, exc)
        except Exception as exc:  # a bug must end the task visibly, not leave it hanging
            log.exception("%s: internal error", ref)
            if self.fleet.holds(ref):
                with contextlib.suppress(Exception):
                    await self.status.phase(ref, Phase.FAILED, f"internal error: {exc}", self._generation(ref),
                                            reason=Reason.INTERNAL_ERROR.value, cell=None, completionTime=now())
        finally:
            self._holding.discard(ref.uid)
            self._deleting.discard(ref.uid)
            self.fleet.release(ref)

    def _generation(self, ref: TaskRef) -> int | None:
        return (self.known.get(ref.uid) or {}).get("metadata", {}).get("generation")

    def _first_status(self, body: dict) -> dict[str, Any] | None:
        """What the claim writes: Bootstrapping (attempt n+1), or Failed when an interrupted
        task has no attempts left. None: nothing to run."""
        status = body.get("status") or {}
        phase, attempts = status.get("phase"), int(status.get("attempts") or 0)
        generation = body["metadata"].get("generation")
        if phase in TERMINAL:
            return None
        if phase in (None, Phase.PENDING.value):
            return _phase_status(Phase.BOOTSTRAPPING, f"claimed by replica {self.fleet.replica}", generation,
                                 startTime=now(), attempts=attempts + 1, cell=None)
        lost = (status.get("claim") or {}).get("replica", "?")
        if attempts >= MAX_ATTEMPTS:
            return _phase_status(Phase.FAILED, f"replica {lost} was lost during {phase}; no attempts left", generation,
                                 reason=Reason.OPERATOR_RESTARTED.value, cell=None, completionTime=now())
        return _phase_status(Phase.BOOTSTRAPPING,
                             f"replica {lost} was lost during {phase}; running again on {self.fleet.replica}",
                             generation, reason=Reason.OPERATOR_RESTARTED.value, startTime=now(),
                             attempts=attempts + 1, cell=None)

    async def _waiting(self, ref: TaskRef, reason: str, message: str) -> None:
        """A task nobody holds says why it waits (the first replica to say it wins; a claim
        made meanwhile is never overwritten: the write carries the version it saw)."""
        body = self.known.get(ref.uid)
        if body is None:
            return
        status = body.get("status") or {}
        current = next((c.get("reason") for c in status.get("conditions") or [] if c.get("type") == "Succeeded"), None)
        if status.get("phase") not in (None, Phase.PENDING.value) or current == reason:
            return
        generation = body["metadata"].get("generation")
        await self.fleet.write_unclaimed(ref, body, _phase_status(Phase.PENDING, message, generation, reason=reason))

    async def _before_push(self, ref: TaskRef) -> None:
        # The push must finish before our Lease could expire for others: a renewal interval of
        # margin plus the third of the duration that fencing keeps in reserve.
        if not await self.fleet.confirm(ref, margin=self.fleet.settings.renew_interval):
            self._lost(ref)
            raise ClaimLost(f"{ref}: no longer held by {self.fleet.holder} before the push")

    def _lost(self, ref: TaskRef) -> None:
        """The API server says the task is someone else's now: drop our run of it."""
        run = self._runs.get(ref.uid)
        if run is not None and run is not asyncio.current_task():
            run.cancel()

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
        runs = [run for uid, run in self._runs.items() if uid in self._holding]
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
                run.cancel()
                await asyncio.wait([run])
            # A finished task has no cell any more (its final status is written after teardown).
            if status.get("phase") not in TERMINAL and self.fleet.claim_alive(claim):
                return f"replica {claim['replica']} runs this task's cell; waiting for it to stop it"
            return None  # nothing of ours to reap: the cell lived in another replica's pod
        return await super().stop(body)

    async def shutdown(self) -> None:
        await super().shutdown()  # cancels the runs; holders hand their tasks back
        await self.fleet.stop()  # and the Lease goes, so nobody waits for it to expire
