"""Budgets enforced while the agent runs: real opencode, real git, the scripted model."""

from __future__ import annotations

import asyncio

import pytest

from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, text, write
from reactor.workflow.control import TaskControl
from reactor.workflow.tcr import run_task
from reactor.workflow.types import Budget, Outcome, Reason, TaskSpec
from reactor_dev.testing.repos import git, worktrees_of
from reactor_dev.testing.workers import port_range

pytestmark = pytest.mark.opencode

# One model step = 40k input + 1k output tokens = $0.135 at the scripted price ($3/$15 per M).
BIG_STEP = (40_000, 1_000)
STEP_COST = 0.135


def runaway(marker: str, steps: int = 12) -> Scenario:
    """An agent that keeps writing files, one big model step each, and would end fine."""
    return Scenario(marker, [write(f"notes/{i}.txt", f"note {i}\n", usage=BIG_STEP) for i in range(steps)]
                    + [text("done")])


def spec(repo, model, task_id, **overrides) -> TaskSpec:
    values = dict(task_id=task_id, prompt=f"{task_id}: write notes", repo=repo, test_command="true",
                  opencode_config=model.opencode_config(), timeout=600)  # generous: a shared machine can be slow
    values.update(overrides)
    return TaskSpec(**values)


async def test_max_cost_stops_the_agent_within_one_step_and_reverts_while_a_task_within_budget_commits(repo, engine):
    main_before = git(repo, "rev-parse", "main")
    control = TaskControl()
    with ScriptedModel([runaway("T-COST"), Scenario("T-FINE", [write("a.txt", "a\n"), text("done")])]) as model:
        result, fine = await asyncio.gather(
            run_task(spec(repo, model, "T-COST", budget=Budget(max_cost=0.3)), engine, control=control),
            run_task(spec(repo, model, "T-FINE", budget=Budget(max_cost=1.0, max_tokens=10_000)), engine))
        answered = [r for r in model.requests if r["scenario"] == "T-COST" and r["kind"] == "tool"]

    assert fine.outcome is Outcome.COMMITTED, fine.message
    assert result.reason is Reason.BUDGET_EXCEEDED, result.message
    assert result.outcome is Outcome.FAILED and result.commit is None and result.branch is None
    assert "maxCost $0.3" in result.message and "$0.4050" in result.message, result.message
    # Crossed at step 3 ($0.405 > $0.30): the agent is stopped before a 5th model answer.
    assert 3 <= len(answered) <= 4, len(answered)
    assert control.spend.steps >= 3 and control.spend.cost == pytest.approx(STEP_COST * control.spend.steps)
    assert result.usage.cost >= 0.4 and result.usage.cost <= 0.3 + 2 * STEP_COST
    # Edits reverted, nothing left: no worktree, no result branch, main untouched.
    assert worktrees_of(repo, engine.work_dir) == []
    assert "reactor/T-COST" not in git(repo, "branch", "--list")
    assert git(repo, "rev-parse", "main") == main_before


def test_reactor_run_max_tokens_stops_the_task_and_shows_what_the_agent_did(repo, work_dir, tmp_path):
    """The CLI as a user runs it: activity lines on stderr, BudgetExceeded, a transcript."""
    import json
    import subprocess
    import sys

    with ScriptedModel([runaway("T-TOK")]) as model:
        config = tmp_path / "opencode.json"
        config.write_text(json.dumps(model.opencode_config()))
        out = subprocess.run([sys.executable, "-m", "reactor.cli", "run", "--task", "T-TOK", "--prompt", "T-TOK: notes",
                              "--repo", str(repo), "--test-cmd", "true", "--opencode-config", str(config),
                              "--max-tokens", "100000", "--json", "--work-dir", str(work_dir),
                              "--port-range", port_range("18000-18500")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr
    result = json.loads(out.stdout)
    assert result["reason"] == "BudgetExceeded" and "123000 tokens > maxTokens 100000" in result["message"]
    assert "[T-TOK]   write notes/0.txt" in out.stderr and "[T-TOK] BudgetWarning: 82% of maxTokens" in out.stderr
    transcript = work_dir / "transcripts" / "local" / "T-TOK.jsonl"
    assert f"transcript: {transcript}" in out.stderr
    records = [json.loads(line) for line in transcript.read_text().splitlines()]
    assert records[-1]["kind"] == "end" and records[-1]["reason"] == "BudgetExceeded"
    used = result["usage"]["input_tokens"] + result["usage"]["output_tokens"]
    print(f"\nbudget overshoot: {used - 100_000} tokens past maxTokens 100000 ({used} used; one step = 41000)")
    assert "reactor/T-TOK" not in git(repo, "branch", "--list")
