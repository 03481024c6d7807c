"""Resume, don't restart (engine side): a run killed mid-turn with its server (an operator's
pod restarted) is taken over by the next run of the same cell, which reopens the agent's
OpenCode session from the cell's state dir with one continuation message; a run killed
while its cell outlives it (--cells-outlive-operator) is reattached to, with no message."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from reactor.infra.cellrecords import verify
from reactor.workflow.engine import Engine
from reactor.workflow.tcr import CONTINUATION, run_task
from reactor.workflow.types import Outcome, Phase, TaskSpec
from reactor_dev.testing.helpers import until
from reactor_dev.testing.killable_run import KillableRun
from reactor_dev.testing.matrix import process_alive
from reactor_dev.testing.repos import git, worktrees_of
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, edit, set_event, text, wait_for, write
from reactor_dev.testing.engine import engine_settings

pytestmark = [pytest.mark.opencode, pytest.mark.timeout(600)]

FIX = edit("calc.py", "return a - b", "return a + b")


def user_texts(request: dict) -> list[str]:
    texts = []
    for message in request["body"]["messages"]:
        if message.get("role") == "user":
            content = message.get("content")
            texts.append(content if isinstance(content, str) else "\n".join(
                p.get("text", "") for p in content or [] if isinstance(p, dict)))
    return texts


async def test_a_run_killed_mid_turn_is_reopened_in_its_session(repo, work_dir):
    reached, never = threading.Event(), threading.Event()
    # The agent writes notes.txt (a tool call before the crash), then its next model call is
    # held until the run is killed; after that the script goes on with the fix.
    steps = [write("notes.txt", "step one\n"), set_event(reached), wait_for(never), FIX, text("Fixed.")]
    with ScriptedModel([Scenario("T-REOPEN", steps)]) as model:
        spec = TaskSpec(task_id="T-REOPEN", prompt="T-REOPEN: fix add() in calc.py", repo=repo,
                        test_command="python3 -m pytest -q", opencode_config=model.opencode_config(), timeout=300)
        first_start = time.time()
        killed = KillableRun(spec, work_dir, "T-REOPEN").start()
        try:
            await until(reached.is_set, 240, "the agent's second model call")
            session = killed.session_id()
            assert session is not None
        finally:
            killed.kill()
        before = len(model.requests)
        assert (work_dir / "worktrees").exists() and len(worktrees_of(repo, work_dir)) == 1, "the checkout is left"

        engine = Engine(engine_settings(work_dir))
        seen: list = []
        resumed_at = time.time()

        async def record(event):
            seen.append(event)

        result = await run_task(spec, engine, record, cell_id="T-REOPEN", reopen_session=session)
        after = [r for r in model.requests[before:] if r.get("scenario") == "T-REOPEN"]

    assert result.outcome is Outcome.COMMITTED, result.message
    assert result.resumed == "reopened"
    assert {e.cell.session_id for e in seen if e.cell.session_id} == {session}, "the same session, reopened"
    ours = [r for r in model.requests if r.get("scenario") == "T-REOPEN"]
    writes = [r for r in ours if r.get("answer") == "tool write"]
    assert len(writes) == 1, "the tool call made before the crash is not repeated"
    continuations = [t for t in user_texts(after[0]) if t.startswith(CONTINUATION.split("{", 1)[0][:40])]
    assert len(continuations) == 1, user_texts(after[0])
    assert "notes.txt" in continuations[0], "the agent is told what is done"
    assert git(repo, "show", "--name-only", "--format=", result.commit).split() == ["calc.py", "notes.txt"]
    assert worktrees_of(repo, work_dir) == [] and engine.ports.held() == {}
    print(f"\nstart to agent busy, first run: {ours[0]['time'] - first_start:.1f}s; "
          f"restart to agent busy (reopen): {after[0]['time'] - resumed_at:.1f}s; model calls after recovery: "
          f"{len(after)} (from scratch: {len(steps) - 2})")


async def test_a_run_killed_mid_turn_whose_cell_outlives_it_is_reattached(repo, work_dir):
    reached, release = threading.Event(), threading.Event()
    # The agent writes notes.txt, then its next model call is held past the run's death; the
    # cell (started to outlive its run) keeps it open, and it is answered once reattached.
    steps = [write("notes.txt", "step one\n"), set_event(reached), wait_for(release), FIX, text("Fixed.")]
    with ScriptedModel([Scenario("T-LIVE", steps)]) as model:
        spec = TaskSpec(task_id="T-LIVE", prompt="T-LIVE: fix add() in calc.py", repo=repo,
                        test_command="python3 -m pytest -q", opencode_config=model.opencode_config(), timeout=300)
        killed = KillableRun(spec, work_dir, "T-LIVE", outlive=True).start()
        try:
            await until(reached.is_set, 240, "the agent's second model call")
            session = killed.session_id()
        finally:
            killed.kill(cells=False)  # the run only: its cell runs on
        engine = Engine(engine_settings(work_dir, cells_outlive_operator=True))
        record = engine.records.read("T-LIVE")
        assert record is not None and record.session_id == session
        live = verify(record, work_dir)
        assert live is not None, "the recorded launcher runs on, and is provably the one recorded"
        before = len(model.requests)
        seen: list = []

        async def report(event):
            seen.append(event)

        resumed_at = time.time()
        run = asyncio.create_task(run_task(spec, engine, report, cell_id="T-LIVE", reopen_session=session,
                                           reattach=live))
        await until(lambda: any(e.phase is Phase.EXECUTING for e in seen), 60, "the reattached run executing")
        busy_after = time.time() - resumed_at
        release.set()
        result = await run
        after = [r for r in model.requests[before:] if r.get("scenario") == "T-LIVE"]

    assert result.outcome is Outcome.COMMITTED, result.message
    assert result.resumed == "reattached"
    assert {e.cell.session_id for e in seen if e.cell.session_id} == {session}, "the same session"
    # Nothing was said to the agent: every model call after the crash carries the task's
    # prompt as its only user message, and the call made before the crash is not repeated.
    assert after and all(len(user_texts(r)) == 1 for r in after), [user_texts(r) for r in after]
    assert [r.get("answer") for r in model.requests if r.get("scenario") == "T-LIVE"].count("tool write") == 1
    assert git(repo, "show", "--name-only", "--format=", result.commit).split() == ["calc.py", "notes.txt"]
    assert not process_alive(record.launcher_pid), "the reattached cell is stopped at teardown"
    assert worktrees_of(repo, work_dir) == [] and engine.ports.held() == {}
    assert engine.records.read("T-LIVE") is None
    print(f"\nrestart to agent busy (reattach): {busy_after:.1f}s; model calls after recovery: {len(after)}")
