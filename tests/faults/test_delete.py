"""Fault matrix, `kubectl delete` in each phase (Pending, Bootstrapping, Executing, Testing,
Pushing), and a delete followed at once by the operator's SIGTERM (the teardown is not
cancelled by the second cancellation). One operator holds four tasks in four phases
and a fifth waiting for capacity; each is deleted where it stands."""

from __future__ import annotations

import signal
import time

import pytest

from reactor.infra.processes import find_marked_processes
from reactor_dev.testing.helpers import wait_for
from reactor_dev.testing.scripted_model import Scenario, edit, hang, text
from reactor_dev.testing.matrix import Matrix, Row, held_boot_args, process_alive
from reactor_dev.testing.workers import port_range

# The module's rows run in its fixture, which the first test pays for.
pytestmark = [pytest.mark.opencode, pytest.mark.kube, pytest.mark.timeout(1200)]

FIX = edit("calc.py", "return a - b", "return a + b")
PORTS = port_range("23200-23300")


def hanging(matrix: Matrix, row: Row) -> bool:
    return any(r["scenario"] == f"{row.name}:" and r["kind"] == "hang" for r in matrix.model.requests)


@pytest.fixture(scope="module")
def held(matrix: Matrix) -> dict[str, Row]:
    """Four tasks held in four phases, a fifth Pending behind them."""
    matrix.start_operator("--port-range", PORTS, "--max-agents", "4",
                          *held_boot_args(matrix.root, 30))
    script = matrix.model.script
    rows = {}
    for name, steps, spec in (
        ("d-exec", [hang(times=1000)], {}),
        ("d-test", [FIX, text("Fixed.")], {"test": {"command": "sleep 120; python3 -m pytest -q"}}),
        ("d-push", [FIX, text("Fixed.")], {}),
        ("d-hold-boot", [FIX, text("Fixed.")], {}),
        ("d-pending", [FIX, text("Fixed.")], {}),
    ):
        script.add(Scenario(f"{name}:", steps))
        rows[name] = matrix.row(name, **spec)
    rows["d-push"].origin.hold()
    for name in ("d-exec", "d-test", "d-push"):
        matrix.apply(rows[name])
    wait_for(lambda: hanging(matrix, rows["d-exec"]), 240, "d-exec: the agent mid-turn")
    matrix.wait_phase(rows["d-test"], "Testing")
    wait_for(rows["d-push"].origin.push_arrived, 240, "d-push: the push in flight")
    matrix.wait_phase(rows["d-push"], "Pushing")
    # Last, so it is still inside its 30 s late start when deleted.
    matrix.apply(rows["d-hold-boot"])
    wait_for(lambda: matrix.get(rows["d-hold-boot"]) and find_marked_processes(
        str(matrix.work_dir.resolve()), matrix.cell_id(rows["d-hold-boot"])), 120, "d-hold-boot: its server starting")
    matrix.apply(rows["d-pending"])
    matrix.wait(rows["d-pending"], lambda o: o and (o.get("status") or {}).get("phase") == "Pending",
                "Pending (capacity)")
    return rows


def delete_and_wait_gone(matrix: Matrix, row: Row, timeout: float = 30) -> float:
    started = time.monotonic()
    matrix.delete(row)
    matrix.wait(row, lambda o: o is None, "deletion", timeout=timeout)
    return time.monotonic() - started


def cancelled_event(matrix: Matrix, row: Row, phase: str) -> dict:
    events = [e for e in matrix.events(row) if e["reason"] == "Cancelled"]
    assert events, f"{row.name}: no Cancelled event"
    assert f"deleted during {phase}" in events[-1]["message"], events[-1]["message"]
    return events[-1]


@pytest.mark.parametrize(("name", "phase"), [
    ("d-pending", "Pending"),
    ("d-hold-boot", "Bootstrapping"),
    ("d-exec", "Executing"),
    ("d-test", "Testing"),
])
def test_delete_in_a_phase_stops_at_once_and_leaves_nothing(held, matrix, name, phase):
    row = held[name]
    assert matrix.phase(row) == phase
    took = delete_and_wait_gone(matrix, row)
    assert took < 20, f"deleting a task in {phase} took {took:.1f}s"
    cancelled_event(matrix, row, phase)
    matrix.assert_nothing_left(row, pushed=False)


def test_delete_while_pushing_lets_the_push_finish_and_report(held, matrix):
    """A push cut off half-way may or may not have landed: once begun it runs to its end,
    its verdict is written, and only then does the task go."""
    row = held["d-push"]
    assert matrix.phase(row) == "Pushing"
    commit = matrix.get(row)["status"]["result"]["commit"]
    matrix.delete(row)
    obj = matrix.wait(row, lambda o: o and o["metadata"].get("deletionTimestamp"), "marked for deletion")
    assert obj["metadata"]["finalizers"] == ["reactor.dev/cleanup"], "held while the push is in flight"
    row.origin.release()
    matrix.wait(row, lambda o: o is None, "deletion after the push", timeout=60)
    succeeded = [e for e in matrix.events(row) if e["reason"] == "Succeeded"]
    assert len(succeeded) == 1 and commit[:12] in succeeded[0]["message"]
    assert row.origin.pushes(row.branch) == [commit]
    matrix.assert_nothing_left(row, pushed=True)


def test_delete_then_operator_sigterm_at_once(held, matrix):
    """Two cancellations of one run (the delete, then the operator's shutdown) do
    not cut its teardown short."""
    row = matrix.row("d-sigterm")
    matrix.model.script.add(Scenario("d-sigterm:", [hang(times=1000)]))
    matrix.apply(row)
    wait_for(lambda: hanging(matrix, row), 240, "d-sigterm: the agent mid-turn")
    obj = matrix.get(row)
    server = obj["status"]["cell"]["serverPid"]
    matrix.delete(row)
    assert matrix.operator.stop(signal.SIGTERM) == 0
    assert not process_alive(server)
    assert find_marked_processes(str(matrix.work_dir.resolve()), matrix.cell_id(row)) == []
    assert not list((matrix.work_dir / "worktrees").glob(f"*/{matrix.cell_id(row)}"))
    # The deletion is finished by the next operator (the finalizer is not stuck).
    matrix.start_operator("--port-range", PORTS, "--max-agents", "4")
    matrix.wait(row, lambda o: o is None, "deletion after the restart", timeout=60)
    matrix.assert_nothing_left(row, pushed=False)
    matrix.assert_range_free()
