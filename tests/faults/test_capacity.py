"""Fault matrix, capacity: 12 tasks under --max-agents 3 (never more than 3 cells, counted
where it happens: the model's open requests)."""

from __future__ import annotations

import pytest

from reactor_dev.testing.scripted_model import Scenario, edit, text
from tests.faults.conftest import Matrix, condition

# The module's rows run in its fixture, which the first test pays for.
pytestmark = [pytest.mark.opencode, pytest.mark.kube, pytest.mark.timeout(1200)]

TASKS, LIMIT = 12, 3


def test_twelve_tasks_never_more_than_three_cells(matrix: Matrix):
    matrix.start_operator("--port-range", "23400-23500", "--max-agents", str(LIMIT))
    rows = []
    for i in range(TASKS):
        name = f"cap-{i:02d}"
        # Each cell's first answer waits until LIMIT cells have a request open at once, so
        # the limit is reached for sure; the model counts the peak as requests come and go.
        matrix.model.script.add(Scenario(f"{name}:", [edit("calc.py", "return a - b", "return a + b", together=LIMIT),
                                                      text("Fixed.")]))
        rows.append(matrix.row(name))
    for row in rows:
        matrix.apply(row)
    waiting = matrix.wait(rows[-1], lambda o: o and (o.get("status") or {}).get("conditions")
                          and condition(o)["reason"] == "WaitingForCapacity", "the last task waiting for capacity")
    assert waiting["status"]["phase"] == "Pending" and f"{LIMIT}/{LIMIT} agents busy" in waiting["status"]["message"]
    matrix.wait_all_terminal(rows, timeout=600)
    assert matrix.model.peak_in_flight == LIMIT
    assert {row.final["status"]["phase"] for row in rows} == {"Succeeded"}, \
        {row.name: row.final["status"]["message"] for row in rows if row.final["status"]["phase"] != "Succeeded"}
    for row in rows:
        matrix.assert_nothing_left(row, pushed=True)
    matrix.assert_range_free()
