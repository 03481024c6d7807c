"""Fault matrix, a stalled agent: a model that stops answering mid-turn, or answers with empty streams
(OpenCode then loops through empty steps at ~80 % CPU), stalls the agent; no progress for
the stall timeout ends the task with AgentStalled, long before its time box, and its cell
is gone. (A model that never answers its very first request is bounded by the time box:
workflow/watch.py says why.)"""

from __future__ import annotations

import pytest

from reactor_dev.testing.scripted_model import Scenario, empty, hang, write
from reactor_dev.testing.matrix import Matrix, Row
from reactor_dev.testing.tasks import condition
from reactor_dev.testing.workers import port_range

# The module's rows run in its fixture, which the first test pays for.
pytestmark = [pytest.mark.opencode, pytest.mark.kube, pytest.mark.timeout(1200)]

STALL_TIMEOUT = 20  # seconds, counted from the start of the agent's turn


@pytest.fixture(scope="module")
def stalled(matrix: Matrix) -> dict[str, Row]:
    matrix.start_operator("--port-range", port_range("23600-23700"), "--stall-timeout", f"{STALL_TIMEOUT}s")
    rows = {}
    for name, steps in (("model-hang", [write("notes.txt", "looking at calc.py\n"), hang(times=1000)]),
                        ("model-empty", [empty(times=100000)])):
        matrix.model.script.add(Scenario(f"{name}:", steps))
        rows[name] = matrix.row(name)  # time box: 5 minutes
        matrix.apply(rows[name])
    matrix.wait_all_terminal(list(rows.values()))
    return rows


@pytest.mark.parametrize("name", ["model-hang", "model-empty"])
def test_a_stalled_agent_is_stopped_at_the_stall_timeout(stalled, matrix, name):
    row = stalled[name]
    status = row.final["status"]
    assert status["phase"] == "Failed" and condition(row.final)["reason"] == "AgentStalled", status["message"]
    assert f"no progress for {STALL_TIMEOUT}s" in status["message"]
    assert status["phaseDurations"]["Executing"] < STALL_TIMEOUT + 60, "stopped at the stall timeout, not the time box"
    kinds = [r["kind"] for r in matrix.model.requests if r["scenario"] == f"{name}:"]
    assert kinds[-1] == name.split("-")[1], f"the model was asked, and answered as scripted: {kinds}"
    matrix.assert_nothing_left(row, pushed=False)
    matrix.assert_range_free()
