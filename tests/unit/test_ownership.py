"""Who runs a task, as rules: the restart rules both ownership policies share, one replica's
recovery of an interrupted run, and a fleet's claims, Lease expiry and fencing on a clock the
test moves (no API server, no waiting). The same claims against a real kube-apiserver:
tests/kube/test_fleet.py."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client as k8s

from reactor.kube.fleet import FleetSettings, LeaseView, ReplicaLeases
from reactor.infra.cellrecords import CellRecord, LiveCell
from reactor.kube.ownership import MAX_ATTEMPTS, FleetOwnership, SingleReplica, green_start, restart_plan
from reactor.kube.resource import AgentTaskStatus, TaskRef

LEASE = 15.0
REF = TaskRef("team", "t1", "uid-1", "2026-01-01T00:00:00Z")


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def body(status: dict[str, Any] | None = None, version: str = "1", **meta: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": REF.namespace, "name": REF.name, "uid": REF.uid, "generation": 1,
                         "resourceVersion": version, **meta},
            "spec": {}, "status": status or {}}


def status(**fields: Any) -> AgentTaskStatus:
    return AgentTaskStatus.model_validate(fields)


# ------------------------------------------------------------------ the restart rules


@pytest.mark.parametrize(("found", "commit", "attempt", "outcome"), [
    ({}, None, 1, "start"),  # new
    ({"phase": "Pending", "attempts": 1}, None, 1, "start"),  # handed back by a clean shutdown: no attempt used
    ({"phase": "Executing", "attempts": 1}, None, 2, "retry"),
    ({"phase": "Testing", "attempts": MAX_ATTEMPTS}, None, MAX_ATTEMPTS, "give up"),
    ({"phase": "Pushing", "attempts": 1}, "3f2a9c1e0b7d5a", 1, "resume the push"),  # not a new attempt
    ({"phase": "Pushing", "attempts": MAX_ATTEMPTS}, "3f2a9c1e0b7d5a", MAX_ATTEMPTS, "resume the push"),
])
def test_restart_rules(found, commit, attempt, outcome):
    plan = restart_plan(status(**found), commit, "operator restarted during X")
    assert plan.attempt == attempt
    assert outcome == ("give up" if plan.give_up else "resume the push" if plan.resume_commit
                       else "retry" if plan.retrying else "start")
    if outcome == "give up":
        assert plan.give_up == "operator restarted during X; no attempts left"
    if outcome == "resume the push":
        assert plan.resume_commit == commit and plan.retrying.endswith("resuming at the push of 3f2a9c1e0b7d")


# ------------------------------------------------------------------ one replica: always ours


class Reaper:
    """The supervisor's reap (kill the recorded server, remove the worktree), recorded."""

    def __init__(self, kept: list[str] | None = None):
        self.calls: list[bool] = []
        self.cells_kept: list[bool] = []
        self.kept = kept or []

    async def __call__(self, ref: TaskRef, found: AgentTaskStatus, keep_results: bool, keep_cell: bool = False) -> list[str]:
        self.calls.append(keep_results)
        self.cells_kept.append(keep_cell)
        return self.kept if keep_results else []


async def test_one_replica_takes_every_task_and_reaps_nothing_of_one_not_started():
    reaper = Reaper()
    single = SingleReplica(reaper)
    assert single.active() and single.may_take(body()) and single.ours(body())
    assert not single.may_take(body({"phase": "Succeeded"}))
    plan = await single.plan(REF, status(phase="Pending", attempts=1))
    assert plan.attempt == 1 and plan.retrying is None and reaper.calls == []


async def test_one_replica_resumes_at_the_push_with_the_commit_its_mirror_kept():
    """Interrupted while Committing, before the commit was recorded: the commit on the kept
    result branch is the result."""
    reaper = Reaper(kept=["c0ffee" * 6 + "c0ff"])
    plan = await SingleReplica(reaper).plan(REF, status(phase="Committing", attempts=1))
    assert reaper.calls == [True], "the result branch is kept"
    assert plan.resume_commit == "c0ffee" * 6 + "c0ff" and plan.attempt == 1
    assert plan.retrying.startswith("operator restarted during Committing; orphaned cell cleaned up; resuming")


async def test_one_replica_runs_an_interrupted_task_again_from_a_fresh_branch():
    reaper = Reaper(kept=["an-agent-commit"])
    plan = await SingleReplica(reaper).plan(REF, status(phase="Executing", attempts=1))
    assert reaper.calls == [False], "the agent's own commits go with the worktree"
    assert plan.resume_commit is None and plan.attempt == 2
    assert plan.retrying == "operator restarted during Executing; orphaned cell cleaned up; running again"


async def test_one_replica_reopens_the_session_of_a_task_cut_off_in_its_agents_work_unless_told_to_restart():
    cell = {"sessionId": "ses_1", "cellId": "team.t1.uid-1"}
    reaper = Reaper()
    plan = await SingleReplica(reaper).plan(REF, status(phase="Testing", attempts=1, cell=cell))
    assert reaper.cells_kept == [True], "only the server goes: the checkout and state dir stay"
    assert plan.reopen_session == "ses_1" and plan.attempt == 2 and plan.resume_commit is None
    assert plan.retrying == ("operator restarted during Testing; reopening the agent's session ses_1 "
                             "on its checkout as it was")
    reaper = Reaper()
    restart = await SingleReplica(reaper).plan(REF, status(phase="Testing", attempts=1, cell=cell), "restart")
    assert restart.reopen_session is None and reaper.cells_kept == [False]
    assert restart.retrying == "operator restarted during Testing; orphaned cell cleaned up; running again"
    adopted = await fleet().plan(REF, status(phase="Executing", attempts=1, cell=cell, **claimed_by("r0.a")))
    assert adopted.reopen_session is None, "a fleet runs a lost replica's task again from the start"


async def test_one_replica_reattaches_to_a_cell_still_running_and_spends_no_attempt():
    cell = {"sessionId": "ses_1", "cellId": "team.t1.uid-1"}
    live = LiveCell(CellRecord("team.t1.uid-1", 4242, 1, 8123, "pw", "ses_1", "1:2.00", 0.0), -1)
    reaper, live_cells = Reaper(), {"team.t1.uid-1": live}
    plan = await SingleReplica(reaper, live_cells).plan(REF, status(phase="Executing", attempts=1, cell=cell))
    assert plan.reattach is live and plan.reopen_session == "ses_1" and plan.attempt == 1
    assert reaper.calls == [] and live_cells == {}, "nothing of the cell is reaped; it is taken once"
    assert plan.retrying == "operator restarted during Executing; reattaching to the agent's running session ses_1"
    restart = await SingleReplica(Reaper(), {"team.t1.uid-1": live}).plan(
        REF, status(phase="Executing", attempts=1, cell=cell), "restart")
    assert restart.reattach is None, "spec.resume restart: the running cell is swept, the task runs again"


# ------------------------------------------------------------------ a fleet: claims and Leases


def fleet(replica: str = "r1", clock: Clock | None = None, reaper: Reaper | None = None, **kwargs: Any) -> FleetOwnership:
    return FleetOwnership(k8s.ApiClient(), FleetSettings(replica, "reactor-system", LEASE), reaper or Reaper(),
                          clock=clock or Clock(), **kwargs)


def claimed_by(holder: str, **fields: Any) -> dict[str, Any]:
    return {"claim": {"replica": holder.split(".")[0], "holder": holder, "since": "2026-01-01T00:00:00.000000Z"},
            **fields}


def test_fencing_comes_at_two_thirds_of_the_lease_before_anyone_may_adopt():
    clock = Clock()
    leases = fleet(clock=clock).leases
    leases.note_renewal(sent=clock.now)
    clock.now += LEASE * 2 / 3 - 0.01
    assert leases.holds_lease()
    clock.now += 0.01
    assert not leases.holds_lease(), "no claim of ours is live from two thirds of the duration on"
    # Another replica that saw this renewal (no earlier than it was sent) waits the full duration.
    observer = fleet("r2", clock=Clock(clock.now - LEASE * 2 / 3)).leases
    observer.note_leases([LeaseView("r1", leases.holder, "t1", LEASE)])
    observer.clock.now += LEASE * 2 / 3
    assert observer.replicas() == {"r1": True}, "still live for the others when it stops"


async def test_a_replica_past_its_deadline_fences_itself():
    clock = Clock()
    fenced: list[str] = []

    async def on_fenced() -> None:
        fenced.append(owner.leases.holder)

    owner = fleet(clock=clock, on_fenced=on_fenced)
    leases = owner.leases
    leases.note_renewal(sent=clock.now)
    incarnation = leases.holder
    leases._held[REF.uid] = incarnation  # a task it claimed
    assert leases.holds(REF) and leases.holder_of(REF) == incarnation
    clock.now += LEASE / 2
    assert await leases.fence_if_due() > 0 and leases.fences == 0
    clock.now += LEASE / 6
    assert await leases.fence_if_due() == 0
    assert leases.fences == 1 and fenced == [leases.holder]
    assert leases.holder != incarnation and leases.holder.startswith("r1."), "a new incarnation"
    assert not leases.holds(REF) and leases.holder_of(REF) is None, "its claims are dead, its writes refused"
    assert not owner.active(), "it claims nothing until its Lease is renewed"


def test_a_lost_replicas_claim_is_adoptable_only_after_its_lease_expires():
    clock = Clock()
    adopter = fleet("r1", clock=clock)
    adopter.leases.note_renewal(sent=clock.now)
    adopter.leases.note_leases([LeaseView("r0", "r0.aa", "t1", LEASE)])
    task = body(claimed_by("r0.aa", phase="Executing", attempts=1))
    assert not adopter.may_take(task)
    clock.now += LEASE - 0.01
    adopter.leases.note_renewal(sent=clock.now)
    adopter.leases.note_leases([LeaseView("r0", "r0.aa", "t1", LEASE)])  # not renewed meanwhile
    assert not adopter.may_take(task)
    clock.now += 0.01
    assert adopter.may_take(task) and adopter.leases.replicas() == {"r0": False}
    # A renewal seen later makes it live again, for a full duration from when it was seen.
    adopter.leases.note_leases([LeaseView("r0", "r0.aa", "t2", LEASE)])
    assert not adopter.may_take(task)


def test_a_restarted_replicas_earlier_claims_die_at_once():
    clock = Clock()
    restarted = fleet("r0", clock=clock)
    restarted.leases.note_renewal(sent=clock.now)
    assert restarted.may_take(body(claimed_by("r0.before", phase="Executing", attempts=1)))
    other = fleet("r1", clock=clock)
    other.leases.note_leases([LeaseView("r0", "r0.before", "t1", LEASE)])
    other.leases.note_leases([LeaseView("r0", restarted.leases.holder, "t1", LEASE)])
    assert other.may_take(body(claimed_by("r0.before", phase="Executing", attempts=1))), \
        "the Lease names a new incarnation: the old one's claims are dead for everyone"


def test_finished_or_deleted_tasks_are_never_claimable():
    owner = fleet()
    owner.leases.note_renewal(sent=owner.leases.clock())
    assert not owner.may_take(body({"phase": "Failed"}))
    assert not owner.may_take(body(deletionTimestamp="2026-01-01T00:00:00Z"))
    assert owner.may_take(body())


def test_what_a_claim_writes():
    owner = fleet("r1")
    first = owner.first_status(body())
    assert first["phase"] == "Bootstrapping" and first["attempts"] == 1 and first["message"] == "claimed by replica r1"
    assert first["conditions"][0]["reason"] == "Bootstrapping"
    adopted = owner.first_status(body(claimed_by("r0.aa", phase="Executing", attempts=1,
                                                 startTime="2026-01-01T00:00:00Z")))
    assert adopted["attempts"] == 2 and adopted["conditions"][0]["reason"] == "OperatorRestarted"
    assert adopted["message"] == "replica r0 was lost during Executing; running again on r1"
    assert adopted["startTime"] == "2026-01-01T00:00:00Z", "the time box is the task's, not the attempt's"
    # No attempts left: the claim writes no phase; the verdict follows through TaskStatus.finish.
    assert owner.first_status(body(claimed_by("r0.aa", phase="Executing", attempts=MAX_ATTEMPTS))) == {"cell": None}
    assert owner.first_status(body({"phase": "Succeeded"})) is None


async def test_an_adopted_task_runs_from_the_start_and_only_our_own_cells_are_reaped():
    reaper = Reaper(kept=["commit-in-our-volume"])
    owner = fleet("r1", reaper=reaper)
    plan = await owner.plan(REF, AgentTaskStatus.of(body(claimed_by("r0.aa", phase="Pushing", attempts=1))))
    assert reaper.calls == [] and plan.resume_commit is None and plan.attempt == 2, \
        "the lost replica's commit lived in its own volume"
    plan = await owner.plan(REF, AgentTaskStatus.of(body(claimed_by("r1.before", phase="Executing", attempts=1))))
    assert reaper.calls == [False] and plan.attempt == 2


START = "5" * 40


@pytest.mark.parametrize(("found", "resume", "looks_from"), [
    ({"phase": "Pushing", "attempts": 1, "result": {"startCommit": START, "commit": "6" * 40}}, "reattach", START),
    ({"phase": "Committing", "attempts": 1, "cell": {"startCommit": START}}, "reattach", START),
    ({"phase": "Testing", "attempts": 1, "cell": {"startCommit": START}}, "reattach", None),  # not green yet
    ({"phase": "Pushing", "attempts": 1, "result": {"startCommit": START}}, "restart", None),  # told to start over
    ({"phase": "Pushing", "attempts": MAX_ATTEMPTS, "result": {"startCommit": START}}, "reattach", None),  # gives up
    ({"phase": "Committing", "attempts": 1}, "reattach", None),  # where it started is not known
])
async def test_an_adopter_looks_for_a_green_record_only_where_the_lost_run_may_have_made_one(found, resume, looks_from):
    """A lost run records its green commit after the tests passed (Committing, Pushing); the
    adopter looks for it from the commit that run started from, as the status recorded it."""
    task = status(**claimed_by("r0.aa", **found))
    assert green_start(task, resume) == looks_from
    plan = await fleet("r1").plan(REF, task, resume)
    assert plan.green_start == looks_from and plan.resume_commit is None
    assert plan.give_up is not None if found["attempts"] == MAX_ATTEMPTS else plan.attempt == 2


class InMemoryTask(ReplicaLeases):
    """The claim loop over one object kept in memory (the API server's part, a resourceVersion
    check, is tested against a real one in tests/kube/test_fleet.py)."""

    def __init__(self, *args: Any, task: dict, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.task = task

    async def read(self, ref: TaskRef) -> dict | None:
        return self.task

    async def refresh(self) -> None:
        pass


async def test_a_claim_refused_for_a_stale_version_is_decided_again_on_a_fresh_read():
    clock = Clock()
    leases = InMemoryTask(k8s.ApiClient(), FleetSettings("r1", "reactor-system", LEASE), clock=clock, task=body())
    leases.note_renewal(sent=clock.now)
    writes: list[tuple[str, dict]] = []

    async def write(read: dict, first: dict) -> bool:
        writes.append((read["metadata"]["resourceVersion"], first))
        if len(writes) == 1:  # someone else wrote in between: the version we read is stale
            leases.task = body({"phase": "Pending", "message": "touched"}, version="2")
            return False
        return True

    claimed = await leases.claim(REF, lambda read: {"phase": "Bootstrapping"}, write)
    assert [version for version, _ in writes] == ["1", "2"]
    assert claimed is not None and claimed[1]["claim"]["holder"] == leases.holder
    assert leases.holds(REF)
    # Another replica's live claim: no claim, nothing written.
    leases.release(REF)
    leases.task = body(claimed_by("r2.bb", phase="Executing"), version="3")
    leases.note_leases([LeaseView("r2", "r2.bb", "t1", LEASE)])
    assert await leases.claim(REF, lambda read: {"phase": "Bootstrapping"}, write) is None
    assert len(writes) == 2 and not leases.holds(REF)


async def test_a_claim_in_flight_when_the_replica_fenced_itself_is_not_held():
    clock = Clock()
    leases = InMemoryTask(k8s.ApiClient(), FleetSettings("r1", "reactor-system", LEASE), clock=clock, task=body())
    leases.note_renewal(sent=clock.now)

    async def write(read: dict, first: dict) -> bool:
        await leases.fence("partitioned")  # the fence lands while the write is on the wire
        return True

    assert await leases.claim(REF, lambda read: {"phase": "Bootstrapping"}, write) is None
    assert not leases.holds(REF)


async def test_a_finished_task_is_claimed_for_its_pull_request_only_once_its_claim_is_dead():
    """The replica that ran a task keeps its claim while it opens and follows the task's PR;
    another takes the PR up only by claiming the task again, after that replica is lost."""
    clock = Clock()
    owner = fleet("r1", clock=clock)
    owner.leases = InMemoryTask(k8s.ApiClient(), FleetSettings("r1", "reactor-system", LEASE), clock=clock,
                                task=body(claimed_by("r0.aa", phase="Succeeded"), version="7"))
    owner.leases.note_renewal(sent=clock.now)
    owner.leases.note_leases([LeaseView("r0", "r0.aa", "t1", LEASE)])
    done = owner.leases.task
    assert not owner.may_adopt(done), "r0 is live: its PR is its own"
    clock.now += LEASE
    owner.leases.note_renewal(sent=clock.now)
    assert owner.may_adopt(done) and not owner.may_take(done), "only its PR is taken up: never run again"
    assert not owner.may_adopt(body(claimed_by("r0.aa", phase="Succeeded"), deletionTimestamp="2026-01-01T00:00:00Z"))
    assert not owner.may_adopt(body(claimed_by("r0.aa", phase="Executing"))), "unfinished: claimed to run"
    assert not owner.may_adopt(body(claimed_by(owner.leases.holder, phase="Succeeded"))), "our own, live"
    assert owner.may_adopt(body(claimed_by("r1.before", phase="Succeeded"))), "our earlier incarnation's"

    writes: list[tuple[str, dict]] = []

    async def write(read: dict, status: dict) -> bool:
        writes.append((read["metadata"]["resourceVersion"], status))
        return True

    assert await owner.claim_finished(REF, write) is done
    assert writes == [("7", {"claim": writes[0][1]["claim"]})] and writes[0][1]["claim"]["holder"] == owner.leases.holder
    assert owner.leases.holds(REF), "its PR status writes are fenced on this claim"
