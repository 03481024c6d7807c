"""BOOT_RETRY is counted once per task: the seed's 2 restarts, 3 boots in all (it used to be
counted in the cell and again in the workflow: up to 9 boots). A server that cannot start
is a real process here (a binary that exits at once); nothing of the cell is left."""

from __future__ import annotations

from reactor_dev.testing.repos import git, worktrees_of
from reactor.workflow.engine import Engine
from reactor.workflow.tcr import run_task
from reactor.workflow.types import Reason, TaskSpec
from tests.workflow.conftest import engine_settings


async def test_a_server_that_never_boots_is_started_three_times_in_all(repo, work_dir, tmp_path):
    broken = tmp_path / "opencode"
    broken.write_text("#!/bin/sh\necho 'cannot start: scripted failure' >&2\nexit 3\n")
    broken.chmod(0o755)
    engine = Engine(engine_settings(work_dir, opencode_bin=str(broken)))
    result = await run_task(TaskSpec(task_id="T-BOOT", prompt="T-BOOT: x", repo=repo, test_command="true"), engine)
    assert result.reason is Reason.BOOT_FAILED
    assert "exited with code 3 before listening" in result.message and "scripted failure" in result.message
    assert result.boot_attempts == 3, "one boot and the seed's 2 restarts"
    assert worktrees_of(repo, work_dir) == [] and git(repo, "branch", "--list", "reactor/*") == ""
    assert engine.ports.held() == {}
