"""Who runs a task: the supervisor's ownership policy, and the restart rules both share.

- ``SingleReplica``: one operator process; every task it sees is its own. Kopf's create and
  resume handlers hand tasks over; an interrupted run's leftovers are on this machine.
- ``FleetOwnership`` (``reactor operator --fleet``): every replica sees every task (kopf's
  on.event); a replica takes a task only once it holds a free slot, by a claim written onto
  the version it read, kept live by its Lease (kube/fleet.py ``ReplicaLeases``). Only the
  holder writes (fenced on the API server) and pushes (after re-reading its claim). A
  finished task's claim stays with the replica that ran it while it opens and follows the
  task's pull request; once that replica is lost, a finished task whose PR work is left is
  claimed again (``claim_finished``: the claim alone), so one replica at a time talks to
  the forge about it.

The restart rules (``restart_plan``) are one: a task interrupted mid-run (the operator
restarted, or the replica that ran it was lost) runs once more from the start (its time box
still counted from its first start) or fails with OperatorRestarted after
``MAX_ATTEMPTS``; one that had committed is resumed at its push where its commit is still
at hand (one replica: the commit is in this machine's mirror). A fleet's lost replica kept
its mirror in its own volume, but recorded each green commit in the task's repository
(``refs/reactor/green/<uid>``): the adopter starts a new cell from it (``green_start``), with a
fresh session, else runs the task again from the start. One replica only: a task interrupted in
Executing or Testing that recorded its agent's session, with spec.resume not restart, is
reopened in that session on its checkout as it was (``reopen_session``); the startup sweep
keeps those cells.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from kubernetes import client as k8s

from reactor.infra.cellrecords import LiveCell
from reactor.kube.fleet import FleetSettings, ReplicaLeases
from reactor.kube.resource import AgentTaskStatus, TaskRef
from reactor.kube.status import Fence, now, phase_status
from reactor.workflow.origin import MirrorOrigin, PushFailed
from reactor.workflow.types import Phase, Reason

# A run interrupted by an operator crash (or a lost replica) is started once more; after that
# it fails with reason OperatorRestarted instead of looping. (A resumed push is not a new attempt.)
MAX_ATTEMPTS = 2
# Phases in which the tests have passed: a commit found on the result branch is the result.
COMMITTED_PHASES = (Phase.COMMITTING, Phase.PUSHING)
# Phases in which the agent's session is worth reopening (its turn, or the tests of its edits).
REOPENED_PHASES = (Phase.EXECUTING, Phase.TESTING)

# reap(ref, status, keep_results, keep_cell=False): the interrupted run's cell (see Supervisor.reap)
Reap = Callable[..., Awaitable[list[str]]]


@dataclass(frozen=True)
class Plan:
    """What a replica does with a task it takes."""

    attempt: int
    resume_commit: str | None = None  # committed before the interruption: push this commit only
    retrying: str | None = None  # why it runs again (the Retrying Event); None: a first start
    give_up: str | None = None  # no attempts left: the verdict's message (reason OperatorRestarted)
    reopen_session: str | None = None  # reopen this OpenCode session on the cell's checkout as it was
    reattach: LiveCell | None = None  # its server still runs (proven): reattach to it instead
    # A fleet: the start commit of a lost run that may have recorded a green commit; look for
    # it and start from it (ownership.green_start).
    green_start: str | None = None


def reopen_session(status: AgentTaskStatus, resume: str) -> str | None:
    """The OpenCode session to reopen after an operator crash: the task was interrupted in its
    agent's turn or its tests, recorded a session, has an attempt left, and ``resume``
    (spec.resume) is not restart."""
    if resume == "restart" or status.phase not in REOPENED_PHASES or status.attempts >= MAX_ATTEMPTS:
        return None
    return (status.cell.session_id if status.cell is not None else None) or None


def restart_plan(status: AgentTaskStatus, commit: str | None, lost: str, again: str = "running again") -> Plan:
    """The restart rules. ``status``: the task as found; ``commit``: a commit of an
    interrupted run that can still be pushed; ``lost``: how the run was lost, for the
    messages ("operator restarted during Executing; orphaned cell cleaned up")."""
    attempts = status.attempts
    if status.waiting:  # not started, or handed back by a clean shutdown: costs no attempt
        return Plan(attempt=max(attempts, 1))
    if commit is not None:
        return Plan(attempt=max(attempts, 1), resume_commit=commit, retrying=f"{lost}; resuming at the push of {commit[:12]}")
    if attempts < MAX_ATTEMPTS:
        return Plan(attempt=attempts + 1, retrying=f"{lost}; {again}")
    return Plan(attempt=attempts, give_up=f"{lost}; no attempts left")


class Ownership(Protocol):
    """What the supervisor asks of its ownership policy."""

    claims: bool  # True: a task is run only once claimed (after a slot is held); False: every task is ours
    fence: Fence | None  # how status writes are fenced (None: plain merge patches)
    known: dict[str, dict]  # a fleet: every task of the watched namespaces, as last seen

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def active(self) -> bool:
        """This replica may take tasks at all (a fleet: it holds its Lease)."""

    def may_take(self, body: dict) -> bool:
        """Nobody else runs the task (a fleet: nobody live holds it)."""

    def ours(self, body: dict) -> bool:
        """The task's status names this replica as its holder."""

    def unclaimed(self, ref: TaskRef) -> dict | None:
        """The object to write "why it waits" onto while nobody holds it; None: do not."""

    async def claim(self, ref: TaskRef, write: Callable[[dict, dict[str, Any]], Awaitable[bool]]) -> dict | None:
        """Make the task ours (``write``: TaskStatus.claim); the body read, or None: not ours."""

    async def plan(self, ref: TaskRef, status: AgentTaskStatus, resume: str = "reattach") -> Plan:
        """Clean up what this replica can reach of an interrupted run, then the restart rules
        (``resume``: the task's spec.resume)."""

    def held_elsewhere(self, status: AgentTaskStatus) -> tuple[str, bool] | None:
        """Another replica named by the task's claim, and whether its claim is live."""

    def release(self, ref: TaskRef) -> None: ...

    def origin(self, ref: TaskRef, origin: MirrorOrigin) -> MirrorOrigin: ...

    async def confirm(self, ref: TaskRef) -> bool:
        """Right before a change outside the cluster (a pull request on the forge): the task is
        still ours on the API server."""

    def may_adopt(self, body: dict) -> bool:
        """A finished task whose claim nobody live holds (its pull request work may be taken up)."""

    async def claim_finished(self, ref: TaskRef, write: Callable[[dict, dict[str, Any]], Awaitable[bool]]) -> dict | None:
        """Claim a finished task for its pull request (``write``: TaskStatus.claim, with the
        claim only); the body read, or None: not ours."""


class SingleReplica:
    """One operator: every task is ours; an interrupted run's cell and commit are on this machine."""

    claims = False
    fence = None

    def __init__(self, reap: Reap, live_cells: dict[str, LiveCell] | None = None):
        self.reap = reap
        self.known: dict[str, dict] = {}  # (unused: kopf's create and resume hand tasks over)
        # Cells an earlier operator left running, proven to be the ones it recorded (by cell id).
        self.live_cells = live_cells if live_cells is not None else {}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def active(self) -> bool:
        return True

    def may_take(self, body: dict) -> bool:
        return not AgentTaskStatus.of(body).finished

    def ours(self, body: dict) -> bool:
        return True

    def unclaimed(self, ref: TaskRef) -> dict | None:
        return None

    async def claim(self, ref: TaskRef, write: Callable[[dict, dict[str, Any]], Awaitable[bool]]) -> dict | None:
        raise AssertionError("one replica claims nothing")

    async def plan(self, ref: TaskRef, status: AgentTaskStatus, resume: str = "reattach") -> Plan:
        session = reopen_session(status, resume)
        if session is not None:
            phase = status.phase.value if status.phase else "Pending"
            live = self.live_cells.pop((status.cell.cell_id if status.cell else None) or ref.cell_id, None)
            if live is not None:
                # The cell outlived the operator and is still the one recorded: its turn goes on.
                # Nothing runs again, so no attempt is spent (the time box still bounds it).
                return Plan(attempt=max(status.attempts, 1), reopen_session=session, reattach=live,
                            retrying=f"operator restarted during {phase}; reattaching to the agent's running "
                                     f"session {session}")
            # spec.resume reattach: the agent's checkout and session stay; only its server goes.
            await self.reap(ref, status, False, keep_cell=True)
            return Plan(attempt=status.attempts + 1, reopen_session=session,
                        retrying=f"operator restarted during {phase}; reopening the agent's session {session} "
                                 "on its checkout as it was")
        commit = None
        if not status.waiting:
            # Only a commit made after the tests passed is a result; any other (the agent's own)
            # goes with the reaped worktree, so the retry starts from a fresh branch.
            committed = bool(status.commit) or status.phase in COMMITTED_PHASES
            kept = await self.reap(ref, status, committed)
            commit = status.commit or (kept[0] if kept else None)
        lost = f"operator restarted during {status.phase.value if status.phase else 'Pending'}; orphaned cell cleaned up"
        return restart_plan(status, commit, lost)

    def held_elsewhere(self, status: AgentTaskStatus) -> tuple[str, bool] | None:
        return None

    def release(self, ref: TaskRef) -> None:
        pass

    def origin(self, ref: TaskRef, origin: MirrorOrigin) -> MirrorOrigin:
        return origin

    async def confirm(self, ref: TaskRef) -> bool:
        return True

    def may_adopt(self, body: dict) -> bool:
        return False  # (one operator resumes its finished tasks' pull requests at start-up)

    async def claim_finished(self, ref: TaskRef, write: Callable[[dict, dict[str, Any]], Awaitable[bool]]) -> dict | None:
        raise AssertionError("one replica claims nothing")


class ClaimedOrigin(MirrorOrigin):
    """Pushes only while the task is still ours: re-read right before the push (and before
    the record of a green commit, which a deposed replica must not overwrite)."""

    def __init__(self, origin: MirrorOrigin, confirm: Callable[[], Awaitable[bool]], green_ref: str | None = None):
        super().__init__(origin.mirrors, origin.namespace, origin.url, origin.credentials, pushes=origin.pushes,
                         green_ref=green_ref)
        self.confirm = confirm

    async def push(self, branch: str, commit: str, replaces: str | None = None) -> None:
        if not await self.confirm():
            raise PushFailed("this replica no longer holds the task (another replica took it over); nothing pushed")
        await super().push(branch, commit, replaces)

    async def record_green(self, commit: str) -> None:
        if not await self.confirm():
            raise PushFailed("this replica no longer holds the task; its green commit is not recorded")
        await super().record_green(commit)


GREEN_REFS = "refs/reactor/green/"  # a fleet's record of each task's green commit, in the task's repository


def green_start(status: AgentTaskStatus, resume: str) -> str | None:
    """A fleet adopting a lost replica's task: the commit the lost run started from, when that
    run may have recorded a green commit (it reached Committing or Pushing: the tests had
    passed) and the task is to resume (``resume``, spec.resume, is not restart). The adopter
    then looks for the record and starts from it (``MirrorOrigin.find_green``). None: run
    from the start."""
    if resume == "restart" or status.phase not in COMMITTED_PHASES or status.attempts >= MAX_ATTEMPTS:
        return None
    start = (status.cell.start_commit if status.cell is not None else None) or \
        (status.result.start_commit if status.result is not None else None)
    return start or None


class FleetOwnership:
    """One replica of many: claims and Leases (kube/fleet.py). Every task of the watched
    namespaces is known here (``known``); a task is taken when nobody live holds it."""

    claims = True

    def __init__(self, api_client: k8s.ApiClient, settings: FleetSettings, reap: Reap, *,
                 on_fenced: Callable[[], Awaitable[None]] | None = None,
                 on_view: Callable[[], Awaitable[None]] | None = None,
                 on_lost: Callable[[TaskRef], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.leases = ReplicaLeases(api_client, settings, on_fenced=on_fenced, on_view=on_view, on_lost=on_lost,
                                    clock=clock)
        self.fence: Fence = self.leases
        self.reap = reap
        self.known: dict[str, dict] = {}  # every task of the watched namespaces, as last seen

    @property
    def replica(self) -> str:
        return self.leases.replica

    async def start(self) -> None:
        await self.leases.start()

    async def stop(self) -> None:
        await self.leases.stop()  # the Lease goes, so nobody waits for it to expire

    def active(self) -> bool:
        return self.leases.holds_lease()

    def may_take(self, body: dict) -> bool:
        return self.leases.claimable(body)

    def ours(self, body: dict) -> bool:
        """The task's claim is this incarnation's (our own claim may be seen before the run
        that made it resumes)."""
        claim = AgentTaskStatus.of(body).claim
        return claim is not None and claim.holder == self.leases.holder

    def unclaimed(self, ref: TaskRef) -> dict | None:
        """The object to write "why it waits" onto, while nobody holds it; None: do not."""
        body = self.known.get(ref.uid)
        return body if body is not None and self.active() and self.may_take(body) else None

    def first_status(self, body: dict) -> dict[str, Any] | None:
        """What the claim writes besides ``claim``: the first phase (Bootstrapping, attempt n),
        or no phase when the task has no attempts left (the verdict follows through
        TaskStatus.finish). None: nothing to run."""
        status = AgentTaskStatus.of(body)
        if status.finished:
            return None
        plan = restart_plan(status, None, self._lost(status), self._again)
        if plan.give_up is not None:
            return {"cell": None}
        message = plan.retrying or f"claimed by replica {self.replica}"
        reason = Reason.OPERATOR_RESTARTED.value if plan.retrying else None
        first = phase_status(Phase.BOOTSTRAPPING, message, body["metadata"].get("generation"), reason)
        return {**first, "startTime": status.start_time or now(), "attempts": plan.attempt, "cell": None}

    async def claim(self, ref: TaskRef, write: Callable[[dict, dict[str, Any]], Awaitable[bool]]) -> dict | None:
        claimed = await self.leases.claim(ref, self.first_status, write)
        return None if claimed is None else claimed[0]

    async def plan(self, ref: TaskRef, status: AgentTaskStatus, resume: str = "reattach") -> Plan:
        # (No reopening: a lost replica's cell lived in its own pod.)
        if not status.waiting and status.claim is not None and status.claim.replica == self.replica:
            await self.reap(ref, status, False)  # our own earlier incarnation's cell
        # A commit the lost replica had not pushed lived in its own volume; what it recorded
        # in the repository (refs/reactor/green/<uid>) is looked for before the run starts.
        plan = restart_plan(status, None, self._lost(status), self._again)
        if plan.give_up is None and plan.retrying is not None:
            plan = dataclasses.replace(plan, green_start=green_start(status, resume))
        return plan

    def _lost(self, status: AgentTaskStatus) -> str:
        lost = status.claim.replica if status.claim is not None and status.claim.replica else "?"
        return f"replica {lost} was lost during {status.phase.value if status.phase else 'Pending'}"

    @property
    def _again(self) -> str:
        return f"running again on {self.replica}"

    def held_elsewhere(self, status: AgentTaskStatus) -> tuple[str, bool] | None:
        claim = status.claim
        if claim is None or not claim.replica or claim.replica == self.replica:
            return None
        return claim.replica, self.leases.claim_alive(claim)

    def release(self, ref: TaskRef) -> None:
        self.leases.release(ref)

    async def confirm(self, ref: TaskRef) -> bool:
        return await self.leases.confirm(ref, margin=self.leases.settings.renew_interval)

    def may_adopt(self, body: dict) -> bool:
        """Finished, not being deleted, and its claim died with its replica (or incarnation):
        the replica that ran it holds it while its pull request is being opened or followed."""
        status = AgentTaskStatus.of(body)
        return (status.finished and not body["metadata"].get("deletionTimestamp")
                and not self.leases.claim_alive(status.claim))

    async def claim_finished(self, ref: TaskRef, write: Callable[[dict, dict[str, Any]], Awaitable[bool]]) -> dict | None:
        # The claim alone, onto the version read: of two replicas adopting it, one wins.
        claimed = await self.leases.claim(ref, lambda body: {}, write, claimable=self.may_adopt)
        return None if claimed is None else claimed[0]

    def origin(self, ref: TaskRef, origin: MirrorOrigin) -> MirrorOrigin:
        # The push must be over before our Lease could expire for others: a renewal interval
        # of margin, plus the third of the duration that fencing keeps in reserve.
        margin = self.leases.settings.renew_interval
        return ClaimedOrigin(origin, lambda: self.leases.confirm(ref, margin=margin), green_ref=GREEN_REFS + ref.uid)


__all__ = ["GREEN_REFS", "MAX_ATTEMPTS", "ClaimedOrigin", "FleetOwnership", "Ownership", "Plan", "SingleReplica",
           "green_start", "restart_plan"]
