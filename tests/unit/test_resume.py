"""Resume, don't restart: which interrupted tasks are reopened, and what of a cell's state
dir (cell-written, untrusted) the operator keeps for the reopened server."""

import os

from reactor.infra.servers import keep_session_store
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
