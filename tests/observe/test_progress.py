"""Live progress and transcripts from a real cell's event stream (real opencode, real git,
the scripted model)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from reactor.opencode.events import Event
from reactor.observe.observation import Observatory
from reactor.observe.transcript import render
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, bash, text, write
from reactor.workflow.control import TaskControl
from reactor.workflow.tcr import run_task
from reactor.workflow.types import Outcome, Phase, TaskSpec

pytestmark = pytest.mark.opencode

SECRET = "tok-3f9c2a7b1e5d4c6a"
# The agent's first tool call blocks until the test releases it: the test sees the tool
# running before the turn ends, and knows it (no timing guesses).
WAIT = "until [ -e .release ]; do sleep 0.05; done; rm .release; echo released"


async def test_progress_shows_the_running_tool_and_the_transcript_records_the_turn(repo: Path, engine, tmp_path):
    observatory = Observatory(tmp_path / "transcripts")
    control = TaskControl()
    observation = observatory.observe("team-a", "t-live", control, secrets=[SECRET])
    worktree: list[str] = []
    bash_running = asyncio.Event()

    def watch(event: Event) -> None:
        observation.on_event(event)
        if observation.progress.tool == "bash" and "until" in observation.progress.activity:
            bash_running.set()

    async def on_phase(event) -> None:
        observation.on_phase(event)
        if event.cell.worktree:
            worktree.append(event.cell.worktree)

    scenario = Scenario("T-LIVE", [bash(WAIT), bash("echo token=$TEAM_TOKEN"), write("hello.txt", "hi\n"),
                                   text("All done.")])
    with ScriptedModel([scenario]) as model:
        spec = TaskSpec(task_id="T-LIVE", prompt="T-LIVE: say hello", repo=repo, test_command="test -f hello.txt",
                        opencode_config=model.opencode_config(), timeout=120, env={"TEAM_TOKEN": SECRET})
        run = asyncio.create_task(run_task(spec, engine, on_phase, control=control, watchers=[watch]))
        follower_records: list[dict] = []

        async def follow() -> None:
            async for record in observatory.transcripts.read("team-a", "t-live", follow=True):
                follower_records.append(record)

        following = asyncio.create_task(follow())
        await asyncio.wait_for(bash_running.wait(), 90)

        # Mid-turn: the tool is running, the turn has not ended (the model was not asked for
        # its final answer yet), and progress says so.
        snapshot = observation.progress.snapshot()
        assert snapshot["tool"] == "bash" and snapshot["activity"].startswith("bash: until [ -e .release ]")
        # A step's tokens and cost come when it ends, after its tool call.
        assert snapshot["toolCalls"] == 1 and snapshot["steps"] == 0 and snapshot["lastActivityTime"]
        assert not [r for r in model.requests if r["scenario"] == "T-LIVE" and r["answer"] == "text"]
        assert observatory.fleet.get("team-a", "t-live").phase == "Executing"

        Path(worktree[-1], ".release").write_text("")
        result = await asyncio.wait_for(run, 120)
        observation.finish(result)
        await asyncio.wait_for(following, 10)

    assert result.outcome is Outcome.COMMITTED, result.message
    final = observation.progress.snapshot()
    assert final["steps"] == 4 and final["toolCalls"] == 3 and final["filesTouched"] == ["hello.txt"]
    assert final["totalTokens"] == 480 and control.spend.cost == pytest.approx(0.0024)
    assert [m.reason for m in observation.milestones] == ["AgentEditing"]

    records = [json.loads(line) for line in observation.transcript.path.read_text().splitlines()]
    assert follower_records == records, "following live gives the same records as reading afterwards"
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "phase" and kinds[-1] == "end" and kinds.count("step") == 4
    assert {"prompt", "tool", "result", "text"} <= set(kinds)
    phases = [r["phase"] for r in records if r["kind"] == "phase"]
    assert phases == ["Bootstrapping", "Executing", "Testing", "Committing", "TearingDown", "Succeeded"]
    assert next(r for r in records if r["kind"] == "prompt")["text"] == "T-LIVE: say hello"
    outputs = [r["output"] for r in records if r["kind"] == "result"]
    assert "released" in outputs[0] and "token=***" in outputs[1], outputs
    transcript_text = observation.transcript.path.read_text()
    assert SECRET not in transcript_text, "the task's secret never reaches the transcript"
    assert "run_with_status.sh" not in transcript_text, "Reactor's own test run is a phase, not an agent tool call"
    lines = [render(r) for r in records]
    assert any("-> bash" in line and "until" in line for line in lines)

    view = observatory.fleet.get("team-a", "t-live")
    assert view.phase == Phase.SUCCEEDED.value and view.files == ["hello.txt"] and view.cost == pytest.approx(0.0024)
    assert observatory.spend.today("team-a").tokens == 480
