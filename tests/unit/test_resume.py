"""Resume, don't restart: which interrupted tasks are reopened, what of a cell's state dir
(cell-written, untrusted) the operator keeps for the reopened server, and how a reattached
cell's unwatched spend is counted."""

import os

from reactor.infra.servers import keep_session_store
from reactor.opencode.models import TokenUsage, Usage
from reactor.workflow.control import Spend, TaskControl
from reactor.workflow.types import Budget, Reason
from reactor.kube.supervisor import resumable_cells


def body(name: str, phase: str, *, session: str | None = "ses_1", resume: str = "reattach", deleting: bool = False,
         attempts: int = 1):
    meta = {"name": name, "namespace": "ns", "uid": f"{name}-uid-0000", "creationTimestamp": ""}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "spec": {"resume": resume},
            "status": {"phase": phase, "attempts": attempts,
                       "cell": {"sessionId": session, "cellId": f"ns.{name}.cell"}}}


def test_tasks_interrupted_in_their_agents_work_keep_their_cells_unless_they_ask_to_restart():
    bodies = [body("exec", "Executing"), body("test", "Testing"), body("boot", "Bootstrapping"),
              body("push", "Pushing"), body("done", "Succeeded"), body("nosession", "Executing", session=None),
              body("restart", "Executing", resume="restart"), body("gone", "Executing", deleting=True),
              body("twice", "Executing", attempts=2)]  # no attempt left: it fails, nothing to keep
    assert resumable_cells(bodies) == {"ns.exec.cell", "ns.test.cell"}


def test_only_opencodes_data_is_kept_and_no_link_of_the_cell_is_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("operator's\n")
    state = tmp_path / "cells" / "c1"
    (state / "data" / "opencode" / "storage").mkdir(parents=True)
    (state / "data" / "opencode" / "opencode.db").write_text("sessions\n")
    (state / "data" / "opencode" / "escape").symlink_to(outside)  # a link inside the store: moved, not followed
    (state / "home").mkdir()
    (state / "home" / ".profile").symlink_to(outside / "secret")
    (state / "tmp").mkdir()
    (state / "tmp" / "junk").write_text("x\n")
    assert keep_session_store(state) is True
    assert sorted(p.name for p in state.iterdir()) == ["data"]
    assert (state / "data" / "opencode" / "opencode.db").read_text() == "sessions\n"
    assert os.readlink(state / "data" / "opencode" / "escape") == str(outside)
    assert (outside / "secret").read_text() == "operator's\n" and sorted(os.listdir(outside)) == ["secret"]
    assert not state.with_name("c1.previous").exists()


def test_a_store_planted_as_a_link_is_refused(tmp_path):
    outside = tmp_path / "outside"
    (outside / "opencode").mkdir(parents=True)
    (outside / "opencode" / "opencode.db").write_text("someone else's\n")
    for planted in ("data", "opencode"):
        state = tmp_path / "cells" / planted
        if planted == "data":
            state.mkdir(parents=True)
            (state / "data").symlink_to(outside)
        else:
            (state / "data").mkdir(parents=True)
            (state / "data" / "opencode").symlink_to(outside / "opencode")
        assert keep_session_store(state) is False, planted
        assert list(state.iterdir()) == []
        assert (outside / "opencode" / "opencode.db").read_text() == "someone else's\n", "nothing moved out of it"
    assert keep_session_store(tmp_path / "cells" / "never") is False


def test_a_reattached_cell_spend_while_unwatched_is_counted_once_and_against_the_budget():
    control = TaskControl(Spend(TokenUsage(input_tokens=100, output_tokens=20), 0.5, 1))  # the last progress
    control.budget = Budget(max_tokens=1000)
    control.catch_up(Usage(input_tokens=300, output_tokens=60, cost=1.5))  # the server's total for the session
    assert (control.spend.tokens.input_tokens, control.spend.tokens.output_tokens, control.spend.cost) == (300, 60, 1.5)
    control.catch_up(Usage(input_tokens=300, output_tokens=60, cost=1.5))
    assert control.spend.total_tokens == 360 and control.request is None, "nothing is counted twice"
    control.catch_up(Usage(input_tokens=1200, output_tokens=60, cost=2.0))
    assert control.request is not None and control.request.reason is Reason.BUDGET_EXCEEDED
