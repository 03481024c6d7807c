"""What the operator writes into an AgentTask's status: the builders and the one writer
(a recording stand-in for the API here; tests/kube and tests/faults use the real one)."""

from __future__ import annotations

from reactor.kube.resource import TaskRef
from reactor.kube.status import Conflict, TaskStatus, cell_status, phase_status, result_status, usage_status
from reactor.workflow.types import CellInfo, Outcome, Phase, PhaseEvent, Reason, TaskResult, Usage

REF = TaskRef("ns", "fix-add", "0123456789abcdef", "2026-01-01T00:00:00Z")


class Recorder:
    """Stands in for StatusWriter: keeps the patches and Events in order."""

    def __init__(self, current_version: str = "1"):
        self.patches: list[dict] = []
        self.versions: list[str | None] = []
        self.events: list[tuple[str, str, bool]] = []
        self.current_version = current_version

    async def patch(self, ref, status, *, on_version=None):
        if on_version is not None and on_version != self.current_version:
            raise Conflict("stale")
        self.patches.append(status)
        self.versions.append(on_version)
        return True

    async def event(self, ref, reason, message, warning=False):
        self.events.append((reason, message, warning))


def committed(**extra) -> TaskResult:
    values = dict(task_id="t", outcome=Outcome.COMMITTED, reason=Reason.COMMITTED, message="pushed", branch="b",
                  commit="a" * 40, files_changed=["calc.py"], test_exit_code=0, pushed=True,
                  usage=Usage(input_tokens=100, output_tokens=20, cost=0.0123))
    return TaskResult(**{**values, **extra})


def test_phase_status_sets_the_succeeded_condition():
    running = phase_status(Phase.EXECUTING, "working", 3)
    assert running["phase"] == "Executing" and running["observedGeneration"] == 3
    assert running["conditions"][0]["status"] == "Unknown" and running["conditions"][0]["reason"] == "Executing"
    done = phase_status(Phase.SUCCEEDED, "ok", 3, "Committed")
    assert done["conditions"][0]["status"] == "True" and done["conditions"][0]["reason"] == "Committed"
    failed = phase_status(Phase.FAILED, "x" * 5000, 3, "TestsFailed")
    assert failed["conditions"][0]["status"] == "False" and len(failed["conditions"][0]["message"]) == 1024


def test_result_usage_and_cell_builders():
    result = result_status(committed(test_output_tail="y" * 3000))
    assert result["shortCommit"] == "aaaaaaa" and result["pushed"] is True and len(result["testOutputTail"]) == 2000
    assert usage_status(committed())["costDisplay"] == "$0.0123"
    cell = cell_status(CellInfo(port=8001, worktree="/w", server_pid=42, session_id="ses", start_commit="b" * 40),
                       REF.cell_id)
    assert cell == {"port": 8001, "worktree": "/w", "serverPid": 42, "sessionId": "ses", "cellId": "ns.fix-add.01234567",
                    "startCommit": "b" * 40}


async def test_one_write_and_one_event_per_phase_in_order_and_nothing_after_the_verdict():
    writer = Recorder()
    status = TaskStatus(writer, REF, 1, attempt=1)
    cell = CellInfo(port=8001, worktree="/w", server_pid=42)
    for phase, extra in ((Phase.BOOTSTRAPPING, {"started_at": 1_800_000_000.0}), (Phase.EXECUTING, {"cell": cell}),
                         (Phase.TESTING, {"cell": cell}), (Phase.COMMITTING, {"cell": cell}),
                         (Phase.PUSHING, {"cell": cell, "result": committed(pushed=False)}),
                         (Phase.TEARING_DOWN, {"cell": cell})):
        await status.report(PhaseEvent(task_id="t", phase=phase, **extra))
    await status.report(PhaseEvent(task_id="t", phase=Phase.EXECUTING, update=True, message="server restarted", cell=cell))
    await status.report(PhaseEvent(task_id="t", phase=Phase.SUCCEEDED, result=committed()))
    await status.requeue(Reason.OPERATOR_SHUTDOWN, "stopping")  # too late: the verdict stands
    await status.finish(committed())

    phases = [p.get("phase") for p in writer.patches]
    assert phases == ["Bootstrapping", "Executing", "Testing", "Committing", "Pushing", "TearingDown", None, "Succeeded"]
    assert [e[0] for e in writer.events] == ["Bootstrapping", "Executing", "Testing", "Committing", "Pushing",
                                             "TearingDown", "Succeeded"]
    bootstrapping, pushing, final = writer.patches[0], writer.patches[4], writer.patches[-1]
    assert bootstrapping["attempts"] == 1 and bootstrapping["startTime"] == "2027-01-15T08:00:00Z"
    assert bootstrapping["cell"] is None, "no cell before it exists"
    assert pushing["result"]["commit"] == "a" * 40, "the commit is recorded before the push (resume point)"
    assert pushing["result"]["pushed"] is False and pushing["result"]["filesChanged"] == ["calc.py"]
    assert writer.patches[6] == {"message": "server restarted", "cell": {**cell_status(cell, REF.cell_id)}}
    assert final["cell"] is None and final["result"]["pushed"] is True and "completionTime" in final


async def test_a_resumed_push_keeps_what_the_first_run_recorded():
    writer = Recorder()
    status = TaskStatus(writer, REF, 1, attempt=1)
    status.previous_result = {"commit": "a" * 40, "filesChanged": ["calc.py"], "testExitCode": 0}
    await status.finish(TaskResult(task_id="t", outcome=Outcome.COMMITTED, reason=Reason.COMMITTED, message="pushed",
                                   commit="a" * 40, branch="b", pushed=True))
    result = writer.patches[-1]["result"]
    assert result["filesChanged"] == ["calc.py"] and result["testExitCode"] == 0 and result["pushed"] is True


async def test_requeue_on_shutdown_is_pending_with_its_reason():
    writer = Recorder()
    status = TaskStatus(writer, REF, 1, attempt=1)
    await status.report(PhaseEvent(task_id="t", phase=Phase.PENDING, reason=Reason.WAITING_FOR_CAPACITY, message="3/3"))
    await status.requeue(Reason.OPERATOR_SHUTDOWN, "operator stopped")
    assert [p["conditions"][0]["reason"] for p in writer.patches] == ["WaitingForCapacity", "OperatorShutdown"]
    assert writer.events[-1] == ("OperatorShutdown", "operator stopped", True)

    assert writer.patches[-1]["claim"] is None and writer.patches[-1]["cell"] is None, "unclaimed: any replica takes it"


def task_body(version: str, **status) -> dict:
    return {"metadata": {"uid": REF.uid, "resourceVersion": version}, "status": status}


async def test_a_fleet_claim_is_written_onto_the_version_read_or_not_at_all():
    writer = Recorder(current_version="7")
    status = TaskStatus(writer, REF, 1, claimed=False)
    claim = {"phase": "Bootstrapping", "attempts": 2, "claim": {"replica": "r1", "holder": "r1.ab"}}
    assert not await status.claim(task_body("6"), claim) and not status.claimed, "stale: read again"
    assert await status.claim(task_body("7"), claim) and status.claimed and status.attempt == 2
    assert writer.versions == ["7"]


async def test_an_unclaimed_task_says_why_it_waits_once_without_an_event():
    writer = Recorder(current_version="3")
    seen = {"body": task_body("3", phase="Pending")}
    status = TaskStatus(writer, REF, 1, claimed=False, unclaimed=lambda: seen["body"])
    await status.waiting(Reason.WAITING_FOR_CAPACITY, "all 2 agents busy")
    assert writer.versions == ["3"] and writer.events == [], "every replica waits for it: no Event"
    seen["body"] = task_body("4", phase="Pending", conditions=[{"type": "Succeeded", "reason": "WaitingForCapacity"}])
    await status.waiting(Reason.WAITING_FOR_CAPACITY, "all 2 agents busy")
    assert len(writer.patches) == 1, "said already (by this replica or another)"
    seen["body"] = task_body("5", phase="Bootstrapping", claim={"replica": "r2", "holder": "r2.x"})
    await status.waiting(Reason.WAITING_FOR_MEMORY, "no memory")
    assert len(writer.patches) == 1, "claimed meanwhile: never overwritten"
    seen["body"] = None  # this replica may not write (not its Lease, or someone holds it)
    await status.waiting(Reason.WAITING_FOR_MEMORY, "no memory")
    await status.requeue(Reason.OPERATOR_SHUTDOWN, "operator stopped")
    assert len(writer.patches) == 1, "nothing to hand back: it never held the task"



async def test_the_pull_request_is_written_after_the_verdict_keeping_it():
    """status.pullRequest and PullRequestOpened: the one write after a verdict; the Succeeded
    condition rides along (a merge patch replaces the list); an Event only when it changes."""
    writer = Recorder()
    status = TaskStatus(writer, REF, 1, attempt=1)
    await status.finish(committed())
    pr = {"url": "http://forge/reactor/app/pulls/1", "number": 1, "headCommit": "a" * 40, "state": "open"}
    await status.write_pull_request(None, False, "ForgeUnavailable", "the forge cannot be reached; retrying")
    await status.write_pull_request(None, False, "ForgeUnavailable", "the forge cannot be reached; retrying (2)")
    await status.write_pull_request(pr, True, "Created", "opened pull request #1")
    assert status.final["result"]["commit"] == "a" * 40 and status.final["usage"]["cost"] == 0.0123
    first, _, last = writer.patches[-3:]
    assert [c["type"] for c in last["conditions"]] == ["Succeeded", "PullRequestOpened"]
    assert last["conditions"][0]["reason"] == "Committed" and last["pullRequest"] == pr
    assert "pullRequest" not in first and first["conditions"][1]["status"] == "False"
    assert [e[0] for e in writer.events[-2:]] == ["ForgeUnavailable", "Created"]  # not one per retry
    assert writer.events[-2][2] is True and writer.events[-1][2] is False


async def test_a_rebase_round_starts_from_pending_without_the_old_result_and_conflict_keeps_the_last():
    writer = Recorder()
    await TaskStatus(writer, REF, 1).rebase_round(2, "rebase round 2 of 2: conflicts in calc.py")
    (round_start,) = writer.patches
    assert (round_start["phase"], round_start["conditions"][0]["reason"], round_start["rebases"]) == (
        "Pending", "Rebasing", 2)
    # The earlier result goes (its branch stays on the origin); the round has its own attempts and box;
    # the spend so far (progress) is not touched: it keeps counting.
    assert {k: round_start[k] for k in ("result", "attempts", "startTime", "completionTime")} == {
        "result": None, "attempts": 0, "startTime": None, "completionTime": None}
    assert "progress" not in round_start and writer.events == [("Rebasing", "rebase round 2 of 2: conflicts in calc.py",
                                                                False)]
    writer = Recorder()
    status = TaskStatus(writer, REF, 1)
    await status.conflict("still conflicts in calc.py after 2 rebase rounds")
    (verdict,) = writer.patches
    assert (verdict["phase"], verdict["conditions"][0]["status"], verdict["conditions"][0]["reason"]) == (
        "Failed", "False", "Conflict")
    assert verdict["completionTime"] and not {"result", "usage", "progress"} & set(verdict), "the last result stays"
    assert writer.events[0][0] == "Failed" and writer.events[0][2] is True and status.finished
