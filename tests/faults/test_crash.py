"""Fault matrix, the operator killed (SIGKILL) with tasks in every phase, then restarted;
one task deleted while it is down; a task that had committed when the operator died is
resumed at the push (same commit, pushed once). (That the time box counts from the task's
first start across a restart is a rule: tests/unit/test_time_box.py.)"""

from __future__ import annotations

import signal

import pytest

from reactor.infra.processes import find_marked_processes
from reactor_dev.testing.helpers import wait_for
from reactor_dev.testing.scripted_model import Scenario, edit, hang, text
from reactor_dev.testing.matrix import Matrix, Row, held_boot_args, process_alive
from reactor_dev.testing.tasks import condition
from reactor_dev.testing.workers import port_range

# The module's rows run in its fixture, which the first test pays for.
pytestmark = [pytest.mark.opencode, pytest.mark.kube, pytest.mark.timeout(1200)]

FIX = edit("calc.py", "return a - b", "return a + b")
TEST_SLEEP = 25  # the Testing phase of k-test lasts this long (each attempt)
BOOT_HOLD = 12  # k-hold-boot starts this late (each attempt; under the 30 s health timeout)


def hanging(matrix: Matrix, row: Row) -> bool:
    return any(r["scenario"] == f"{row.name}:" and r["kind"] == "hang" for r in matrix.model.requests)


@pytest.fixture(scope="module")
def crash(matrix: Matrix) -> dict:
    args = ("--port-range", port_range("23300-23400"), "--max-agents", "5",
            *held_boot_args(matrix.root, BOOT_HOLD))
    op = matrix.start_operator(*args)
    script = matrix.model.script
    rows: dict[str, Row] = {}
    for name, steps, spec in (
        ("k-exec", [hang(times=1), FIX, text("Fixed.")], {}),
        ("k-gone", [hang(times=1000)], {}),
        ("k-push", [FIX, text("Fixed.")], {}),
        ("k-test", [FIX, text("Fixed.")], {"test": {"command": f"sleep {TEST_SLEEP}; python3 -m pytest -q"}}),
        ("k-hold-boot", [FIX, text("Fixed.")], {}),
        ("k-pending", [FIX, text("Fixed.")], {}),
    ):
        script.add(Scenario(f"{name}:", steps))
        rows[name] = matrix.row(name, **spec)
    rows["k-push"].origin.hold()
    for name in ("k-exec", "k-gone", "k-push"):
        matrix.apply(rows[name])
    wait_for(lambda: hanging(matrix, rows["k-exec"]) and hanging(matrix, rows["k-gone"]), 240, "agents mid-turn")
    wait_for(rows["k-push"].origin.push_arrived, 240, "k-push: the push in flight")
    # The phases that pass by themselves come last, just before the kill.
    matrix.apply(rows["k-test"])
    matrix.wait_phase(rows["k-test"], "Testing")
    matrix.apply(rows["k-hold-boot"])
    wait_for(lambda: matrix.get(rows["k-hold-boot"]) and find_marked_processes(
        str(matrix.work_dir.resolve()), matrix.cell_id(rows["k-hold-boot"])), 60, "k-hold-boot: its server starting")
    matrix.apply(rows["k-pending"])
    matrix.wait(rows["k-pending"], lambda o: o and (o.get("status") or {}).get("phase") == "Pending", "Pending")

    before = {name: matrix.get(row) for name, row in rows.items()}
    phases = {name: obj["status"]["phase"] for name, obj in before.items()}
    assert phases == {"k-exec": "Executing", "k-gone": "Executing", "k-push": "Pushing",
                      "k-test": "Testing", "k-hold-boot": "Bootstrapping", "k-pending": "Pending"}
    orphans = {name: (obj["status"].get("cell") or {}).get("serverPid") for name, obj in before.items()}
    op.stop(signal.SIGKILL)

    # While it is down: one task is deleted, and the held push is let go (it was killed with
    # the operator; nothing reached the origin).
    matrix.delete(rows["k-gone"])
    assert rows["k-push"].origin.pushes(rows["k-push"].branch) == []
    rows["k-push"].origin.release()
    # Each cell's launcher gets SIGTERM when its operator dies (PR_SET_PDEATHSIG) and ends its
    # whole cell: nothing is left running for the restart to find.
    orphans = {name: pid for name, pid in orphans.items() if pid}
    wait_for(lambda: not any(process_alive(pid) for pid in orphans.values()), 60, "the cells ended with the operator")
    matrix.start_operator(*args)
    matrix.wait(rows["k-gone"], lambda o: o is None, "k-gone deleted after the restart", timeout=120)
    matrix.wait_all_terminal([r for n, r in rows.items() if n != "k-gone"], timeout=420)
    return {"rows": rows, "before": before, "orphans": orphans}


def test_the_killed_operators_cells_ended_with_it(crash):
    assert set(crash["orphans"]) >= {"k-exec", "k-gone", "k-test"}, "these cells were running at the kill"
    for name, pid in crash["orphans"].items():
        assert not process_alive(pid), f"{name}: cell launcher {pid} still runs"


@pytest.mark.parametrize(("name", "attempts"), [
    ("k-pending", 1), ("k-hold-boot", 2), ("k-exec", 2), ("k-test", 2),
])
def test_a_task_interrupted_by_the_crash_runs_again_and_succeeds(crash, matrix, name, attempts):
    row = crash["rows"][name]
    status = row.final["status"]
    assert status["phase"] == "Succeeded", status["message"]
    assert status["attempts"] == attempts
    retried = [e for e in matrix.events(row) if e["reason"] == "Retrying"]
    if attempts == 2:
        before = crash["before"][name]["status"]["phase"]
        assert retried and f"operator restarted during {before}" in retried[0]["message"]
    matrix.assert_nothing_left(row, pushed=True)


def test_a_committed_task_resumes_at_the_push_with_the_same_commit(crash, matrix):
    """The commit passed its tests; the push was cut off by the crash."""
    row = crash["rows"]["k-push"]
    recorded = crash["before"]["k-push"]["status"]["result"]["commit"]
    status = row.final["status"]
    assert status["phase"] == "Succeeded" and condition(row.final)["reason"] == "Committed", status["message"]
    assert status["attempts"] == 1, "a resumed push is not a new attempt"
    assert status["result"]["commit"] == recorded and status["result"]["pushed"] is True
    assert status["result"]["filesChanged"] == ["calc.py"] and status["result"]["testExitCode"] == 0
    assert row.origin.pushes(row.branch) == [recorded], "pushed once, the commit that was tested"
    retried = [e for e in matrix.events(row) if e["reason"] == "Retrying"]
    assert retried and "resuming at the push" in retried[0]["message"]
    matrix.assert_nothing_left(row, pushed=True)


def test_a_task_deleted_while_the_operator_was_down(crash, matrix):
    row = crash["rows"]["k-gone"]
    assert "k-gone" in crash["orphans"] and not process_alive(crash["orphans"]["k-gone"])
    matrix.assert_nothing_left(row, pushed=False)


def test_nothing_of_the_module_is_left(crash, matrix):
    matrix.assert_range_free()
