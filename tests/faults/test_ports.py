"""Fault matrix: a --port-range whose every port is held by another listener."""

from __future__ import annotations

import socket

import pytest

from reactor_dev.testing.scripted_model import Scenario, edit, text
from reactor_dev.testing.matrix import Matrix
from reactor_dev.testing.tasks import condition
from reactor_dev.testing.workers import ports

# The module's rows run in its fixture, which the first test pays for.
pytestmark = [pytest.mark.opencode, pytest.mark.kube, pytest.mark.timeout(1200)]


def test_every_port_of_the_range_held_by_other_listeners(matrix: Matrix):
    ours = ports(23500, 23503)  # this test worker's own
    low, high = ours.start, ours.end
    listeners = []
    try:
        for port in range(low, high):
            sock = socket.socket()
            sock.bind(("127.0.0.1", port))
            sock.listen()
            listeners.append(sock)
        op = matrix.start_operator("--port-range", f"{low}-{high}")
        matrix.model.script.add(Scenario("no-ports:", [edit("calc.py", "return a - b", "return a + b"), text("Fixed.")]))
        row = matrix.row("no-ports")
        matrix.apply(row)
        matrix.wait_all_terminal([row], timeout=120)
        status = row.final["status"]
        assert status["phase"] == "Failed" and condition(row.final)["reason"] == "BootFailed"
        assert f"no free port in {low}-{high}" in status["message"] and "--port-range" in status["message"]
        matrix.assert_nothing_left(row, pushed=False)
        assert op.process.poll() is None, "the operator lives on"
    finally:
        for sock in listeners:
            sock.close()
