"""20 kill/resume cycles leave no process, port or checkout behind.

At the engine level, the cheapest that proves it: each cycle is one run of the task in a
process of its own (``KillableRun``: the engine and its cells, as in an operator), SIGKILLed
at a varied point (while bootstrapping, or mid-turn), its cells either ending with it or
outliving it (``--cells-outlive-operator``), and the next run resumes the task the way a
restarted operator does (``resume_run``: the startup sweep, then reattach, reopen or start
again). The operator's Kubernetes side adds nothing to what is left on the machine: it
passes the same sets to the same sweep (tests/kube/test_operator.py runs it once for real).
"""

from __future__ import annotations

import threading
import time

import pytest

from reactor.infra.ports import port_is_free
from reactor.infra.processes import find_marked_processes
from reactor.workflow.engine import Engine
from reactor.workflow.types import Outcome, Phase, TaskSpec
from reactor_dev.testing.engine import engine_settings
from reactor_dev.testing.helpers import wait_for
from reactor_dev.testing.killable_run import KillableRun, last_session, resume_run
from reactor_dev.testing.matrix import process_alive
from reactor_dev.testing.repos import git, worktrees_of
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, edit, text, wait_for as hold_until, write

pytestmark = [pytest.mark.opencode, pytest.mark.timeout(900)]

CYCLES = 20
FIX = edit("calc.py", "return a - b", "return a + b")


async def test_twenty_kill_resume_cycles_leave_no_process_port_or_checkout(repo, work_dir):
    hold = threading.Event()
    # Every turn after the first tool call is held until the end: each run dies mid-turn or
    # before its turn, whichever point it is killed at. How many turns the last session has
    # seen depends on where the runs died (continuations, fresh sessions), so the fix is
    # offered at each of the next turns (once made, the others fail harmlessly).
    steps = [write("notes.txt", "step one\n"), *[hold_until(hold)] * (2 * CYCLES + 2), *[FIX] * 4, text("Fixed.")]
    began = time.monotonic()
    with ScriptedModel([Scenario("T-CYCLES", steps)]) as model:
        spec = TaskSpec(task_id="T-CYCLES", prompt="T-CYCLES: fix add() in calc.py", repo=repo,
                        test_command="python3 -m pytest -q", opencode_config=model.opencode_config(), timeout=600)
        runs = []
        for cycle in range(CYCLES):
            # Kill points vary: as soon as it bootstraps, or once its agent's turn is under way.
            # Cells outlive their run but in one cycle of five (a cell that outlived its run is
            # reattached to without a boot, which keeps the 20 cycles cheap).
            outlive, mid_turn = cycle % 5 != 3, cycle % 3 != 0
            run = KillableRun(spec, work_dir, "T-CYCLES", outlive=outlive, resume=cycle > 0).start()
            runs.append(run)
            seen = len(run.events())
            wanted = Phase.EXECUTING if mid_turn else Phase.BOOTSTRAPPING
            wait_for(lambda: any(e.phase is wanted for e in run.events()[seen:]), 120, f"cycle {cycle}: {wanted.value}")
            run.kill(cells=False)  # the run only: what its cells do is theirs to show
        pids = {e.cell.server_pid for e in runs[-1].events() if e.cell.server_pid}
        ports = {e.cell.port for e in runs[-1].events() if e.cell.port}
        cycles_took = time.monotonic() - began

        hold.set()  # the last run goes to its verdict
        engine = Engine(engine_settings(work_dir))
        result = await resume_run(spec, engine, "T-CYCLES", last_session(runs[-1].events_path), None)
        last_took = time.monotonic() - began - cycles_took

    assert result.outcome is Outcome.COMMITTED, result.message
    assert "calc.py" in git(repo, "show", "--name-only", "--format=", result.commit).split()
    assert find_marked_processes(str(work_dir.resolve())) == [], "no process of any cell is left"
    assert [pid for pid in pids if process_alive(pid)] == [], "no launcher of any cycle is left"
    assert all(port_is_free(port) for port in ports), "no port is left held"
    assert worktrees_of(repo, work_dir) == [], "no checkout is left"
    assert not any((work_dir / "cells").iterdir()) and not any((work_dir / "operator" / "cells").glob("*.json"))
    print(f"\n{CYCLES} kill/resume cycles in {cycles_took:.1f}s, the last run {last_took:.1f}s; processes left: 0; "
          f"the last run {result.resumed}")
