"""The time box is the task's, counted from its first start, like a Job's
activeDeadlineSeconds: a restart or an adoption grants no fresh box. Checked on a clock the
test sets (no waiting)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from reactor.infra.ports import PortRange
from reactor.workflow.engine import Engine, EngineSettings
from reactor.workflow.tcr import TimeBox, run_task
from reactor.workflow.types import Outcome, Phase, Reason, TaskSpec

FIRST_START = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def test_the_box_runs_from_the_first_start_not_from_this_attempt():
    box = TimeBox(60, FIRST_START)
    # An attempt resumed 40 s after the first start has 20 s left, not 60.
    assert box.left(FIRST_START + 40) == 20
    assert box.left(FIRST_START + 60) == 0
    assert box.left(FIRST_START + 75) < 0
    assert box.describe() == "time box of 60s (counted from the first start, 2027-01-15T08:00:00Z)"


async def test_an_attempt_begun_after_the_box_ran_out_ends_at_once_with_timeout(tmp_path: Path):
    """The operator restarted (or another replica adopted the task) after the task's box had
    run out: the new attempt starts no cell and fails with Timeout."""
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "base"], check=True)
    engine = Engine(EngineSettings(work_dir=tmp_path / "work", port_range=PortRange(18900, 18910),
                                   opencode_bin="/bin/true"))  # never started: the box ran out
    spec = TaskSpec(task_id="T-BOX", prompt="p", repo=repo, timeout=60, started_at=FIRST_START)
    phases: list[Phase] = []

    async def on_phase(event):
        phases.append(event.phase)

    result = await run_task(spec, engine, on_phase, take_capacity=False, clock=lambda: FIRST_START + 61)

    assert result.outcome is Outcome.FAILED and result.reason is Reason.TIMEOUT
    assert "expired before this attempt could start" in result.message
    assert "counted from the first start, 2027-01-15T08:00:00Z" in result.message
    assert phases == [Phase.TEARING_DOWN, Phase.FAILED], "no cell was started"
    assert result.started_at == FIRST_START
    assert engine.ports.held() == {}
