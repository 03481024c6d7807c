"""Fault matrix, capacity: 3 tasks under --max-agents 2 (never more than 2 cells, counted
where it happens: the model's open requests; the third waits, saying why). The limit is a
count, so two cells prove it as well as twelve; the admission rule itself is unit-tested
(tests/unit/test_capacity.py)."""

from __future__ import annotations

import pytest

from reactor_dev.testing.scripted_model import Scenario, edit, text
from reactor_dev.testing.matrix import Matrix
from reactor_dev.testing.tasks import condition
from reactor_dev.testing.workers import port_range

# The module's rows run in its fixture, which the first test pays for.
pytestmark = [pytest.mark.opencode, pytest.mark.kube, pytest.mark.timeout(1200)]

TASKS, LIMIT = 3, 2


def test_never_more_cells_than_max_agents_and_the_rest_wait(matrix: Matrix):
    matrix.start_operator("--port-range", port_range("23400-23500"), "--max-agents", str(LIMIT))
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
