"""A result the merge queue ejected for a textual conflict goes back to its task: a cell on
the base's new tip starts from the result replayed with conflict markers, the agent
(scripted, real opencode) resolves them, and the new result integrates."""

from __future__ import annotations

import pytest

from reactor.mergequeue import EntryState, LocalBranch, MemoryStore, MergeQueue, QueueConfig, rebase_prompt
from reactor.workflow.tcr import run_task
from reactor.workflow.types import Outcome, TaskSpec
from reactor_dev.testing.mergequeue import (TEST_COMMAND, base_history, confined_tests, failing_commits, git,
                                            make_queue_repo, make_result)
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, bash, text

pytestmark = pytest.mark.opencode

# Resolves only when the checkout holds the conflict: the agent's side wins.
RESOLVE = bash("grep -q '^<<<<<<<' shared.py && printf 'VALUE = 3\\n' > shared.py")


async def test_a_textual_conflict_is_resolved_in_the_tasks_rebase_round_and_then_integrates(tmp_path, engine):
    repo = make_queue_repo(tmp_path / "repo", {
        "shared.py": "VALUE = 1\n",
        "check_shared.py": "def check():\n    import shared\n    assert isinstance(shared.VALUE, int)\n"})
    queue = MergeQueue(MemoryStore(), LocalBranch(repo, "main"), confined_tests(engine.work_dir),
                       QueueConfig(str(repo), "main", TEST_COMMAND))
    queue.enqueue("a", *make_result(repo, "a", {"shared.py": "VALUE = 2\n"}))
    queue.enqueue("b", *make_result(repo, "b", {"shared.py": "VALUE = 3\n"}))
    await queue.drain()
    b = queue.state.get("b")
    assert (b.state, b.reason, b.conflict_paths) == (EntryState.EJECTED, "TextualConflict", ["shared.py"])
    onto = git(repo, "rev-parse", "main")

    with ScriptedModel([Scenario("Task b", [RESOLVE, text("Resolved the conflict.")])]) as model:
        result = await run_task(TaskSpec(
            task_id="b-round-2", description="set VALUE to 3", repo=repo, test_command=TEST_COMMAND,
            prompt=rebase_prompt("Task b: set VALUE to 3", "main", onto, b.conflict_paths),
            start_from=b.conflict_commit, opencode_config=model.opencode_config(), timeout=180), engine)
    assert result.outcome is Outcome.COMMITTED, result.message
    queue.enqueue_result("b", result.commit)
    await queue.drain()
    assert queue.state.get("b").state is EntryState.INTEGRATED
    assert git(repo, "show", "main:shared.py") == "VALUE = 3"
    assert failing_commits(repo, base_history(repo)) == []
