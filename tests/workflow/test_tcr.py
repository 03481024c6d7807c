"""Test-Commit-Revert end to end: the real opencode server, real git, the scripted model.

Rows a user meets the same way through the operator are tested once, there (tests/faults:
a missing test command, a stalled agent, a permission prompt, a protected path changed)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from reactor_dev.testing.engine import engine_settings
from reactor_dev.testing.attacks import TESTED_MARK, hanging_filters, plant_hanging_filter
from reactor_dev.testing.helpers import until
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, edit, fail, hang, text
from reactor.workflow.engine import Engine
from reactor.workflow.tcr import run_task
from reactor.workflow.types import Outcome, Phase, Reason, TaskSpec
from reactor_dev.testing.repos import git, worktrees_of

pytestmark = pytest.mark.opencode

FIX = edit("calc.py", "return a - b", "return a + b")
WRONG_FIX = edit("calc.py", "return a - b", "return a * b")


def spec(repo, model: ScriptedModel, task_id: str, **overrides) -> TaskSpec:
    values = dict(task_id=task_id, description="Fix add", prompt=f"{task_id}: fix add() in calc.py",
                  repo=repo, test_command="python3 -m pytest -q", opencode_config=model.opencode_config(),
                  timeout=120)
    values.update(overrides)
    return TaskSpec(**values)


def assert_nothing_left(repo, engine):
    assert worktrees_of(repo, engine.work_dir) == []
    assert engine.ports.held() == {}
    assert not any(engine.cells_dir.iterdir()) if engine.cells_dir.exists() else True
    assert git(repo, "status", "--porcelain") == "", "the user's checkout is untouched"


async def test_a_passing_fix_is_committed_on_the_result_branch(repo, engine):
    main_before = git(repo, "rev-parse", "main")
    phases = []

    async def record(event):
        phases.append(event.phase)

    with ScriptedModel([Scenario("T-OK", [FIX, text("Fixed add().")])]) as model:
        result = await run_task(spec(repo, model, "T-OK"), engine, record)

    assert result.outcome is Outcome.COMMITTED, result.message
    assert phases == [Phase.BOOTSTRAPPING, Phase.EXECUTING, Phase.TESTING, Phase.COMMITTING,
                      Phase.TEARING_DOWN, Phase.SUCCEEDED]
    assert git(repo, "rev-parse", "reactor/T-OK") == result.commit
    assert git(repo, "log", "-1", "--format=%s", "reactor/T-OK") == "Task T-OK: Fix add"
    assert "return a + b" in git(repo, "show", "reactor/T-OK:calc.py")
    # The repository has no .gitignore: the test run's __pycache__ must not be committed.
    assert git(repo, "show", "--name-only", "--format=", "reactor/T-OK") == "calc.py"
    assert git(repo, "rev-parse", "main") == main_before
    assert result.files_changed == ["calc.py"] and result.test_exit_code == 0
    assert "1 passed" in result.test_output_tail
    assert result.usage.input_tokens > 0 and result.usage.output_tokens > 0
    assert set(result.phase_durations) >= {"Bootstrapping", "Executing", "Testing", "Committing", "TearingDown"}
    assert_nothing_left(repo, engine)


async def test_a_wrong_fix_is_reverted_and_nothing_is_committed(repo, engine):
    main_before = git(repo, "rev-parse", "main")
    with ScriptedModel([Scenario("T-BAD", [WRONG_FIX, text("Done.")])]) as model:
        result = await run_task(spec(repo, model, "T-BAD"), engine)
    assert result.outcome is Outcome.REVERTED and result.reason is Reason.TESTS_FAILED
    assert result.test_exit_code == 1 and "assert" in result.test_output_tail
    assert result.commit is None
    assert git(repo, "branch", "--list", "reactor/T-BAD") == ""
    assert git(repo, "rev-parse", "main") == main_before
    assert_nothing_left(repo, engine)


async def test_server_killed_mid_task_is_restarted_boot_retry(repo, engine):
    """The model hangs on the first request; we kill the server's process group meanwhile.
    BOOT_RETRY restarts it with a fresh session, and the task still commits."""
    killed = []
    with ScriptedModel([Scenario("T-KILL", [hang(times=1), FIX, text("Fixed.")])]) as model:

        async def kill_when_the_agent_is_waiting(pid: int) -> None:
            await until(lambda: any(r.get("kind") == "hang" for r in model.requests))
            os.killpg(pid, signal.SIGKILL)
            killed.append(pid)

        async def on_phase(event):
            # The callback runs before the prompt is sent: kill from a task of its own.
            if event.phase is Phase.EXECUTING and not killers:
                killers.append(asyncio.create_task(kill_when_the_agent_is_waiting(event.cell.server_pid)))

        killers: list[asyncio.Task] = []
        result = await run_task(spec(repo, model, "T-KILL"), engine, on_phase)
        await asyncio.gather(*killers)
    assert len(killed) == 1
    assert result.outcome is Outcome.COMMITTED, result.message
    assert result.boot_attempts == 2
    assert_nothing_left(repo, engine)


async def test_model_errors_are_retried_r3(repo, engine):
    # retry_after: OpenCode honours retry-after-ms, so its own six attempts take ~0.5 s.
    failing = fail(500, times=R3_FAILURES, retry_after=0.05)
    with ScriptedModel([Scenario("T-500", [failing, FIX, text("Fixed.")])]) as model:
        result = await run_task(spec(repo, model, "T-500"), engine)
        failures = [r for r in model.requests if r.get("kind") == "fail"]
    assert len(failures) == R3_FAILURES
    assert result.outcome is Outcome.COMMITTED, result.message
    assert result.prompt_attempts == 2, "the first prompt failed, R3 retried it once"
    assert_nothing_left(repo, engine)


async def test_a_hanging_model_hits_the_time_box_and_is_reverted(repo, engine):
    with ScriptedModel([Scenario("T-HANG", [hang(times=100)])]) as model:
        result = await run_task(spec(repo, model, "T-HANG", timeout=8), engine)
    assert result.outcome is Outcome.FAILED and result.reason is Reason.TIMEOUT
    assert "time box" in result.message
    assert git(repo, "branch", "--list", "reactor/T-HANG") == ""
    assert_nothing_left(repo, engine)


async def test_an_agent_that_changes_nothing_fails_clearly(repo, engine):
    with ScriptedModel([Scenario("T-NOOP", [text("Nothing to do.")])]) as model:
        result = await run_task(spec(repo, model, "T-NOOP"), engine)
    assert result.outcome is Outcome.FAILED and result.reason is Reason.NO_CHANGES
    assert "changed no file" in result.message
    assert_nothing_left(repo, engine)


async def test_bad_repository_or_base_branch_fail_before_anything_starts(tmp_path, repo, engine):
    with ScriptedModel([]) as model:
        plain = tmp_path / "plain"
        plain.mkdir()
        not_git = await run_task(spec(plain, model, "T-X"), engine)
        no_branch = await run_task(spec(repo, model, "T-Y", base_branch="develop"), engine)
    assert not_git.reason is Reason.INVALID_INPUT and "not a git repository" in not_git.message
    assert no_branch.reason is Reason.INVALID_INPUT and "'develop' does not exist" in no_branch.message
    assert not_git.boot_attempts == no_branch.boot_attempts == 0, "no server was started"
    assert not_git.phase_durations.keys() == no_branch.phase_durations.keys() == {"Bootstrapping", "TearingDown"}
    assert_nothing_left(repo, engine)


# OpenCode makes six attempts of its own before a model error reaches Reactor (measured:
# docs/opencode-api.md); six 500s fail the first prompt, R3's second prompt succeeds.
R3_FAILURES = 6


async def test_a_commit_that_hangs_ends_at_its_deadline_with_timeout_and_leaves_nothing(repo, work_dir):
    """Committing has a deadline of its own (commit_grace from its start, 3 s here), however
    much of the time box is left: then the hanging git step and its filter are killed."""
    grace, box = 3.0, 600
    engine = Engine(engine_settings(work_dir, commit_grace=grace))
    phases = []

    async def record(event):
        phases.append(event.phase)

    with ScriptedModel([Scenario("T-HANG-COMMIT", [plant_hanging_filter(), FIX, text("Fixed.")])]) as model:
        task = spec(repo, model, "T-HANG-COMMIT", timeout=box, test_command=f"python3 -m pytest -q && touch {TESTED_MARK}")
        result = await run_task(task, engine, record)
    assert (result.outcome, result.reason) == (Outcome.FAILED, Reason.TIMEOUT), result.message
    assert "committing ran past its deadline of 3s: git add" in result.message and "nothing committed" in result.message
    assert Phase.COMMITTING in phases and result.test_exit_code == 0, "the tests passed; the commit hung"
    assert result.phase_durations["Committing"] < grace + 5, result.phase_durations  # not the rest of the box
    assert git(repo, "branch", "--list", "reactor/T-HANG-COMMIT") == "" and result.commit is None
    assert hanging_filters(work_dir) == []
    assert_nothing_left(repo, engine)
