"""The rebase rounds' rules (kube/rebase.py): when a queued result goes back to its task,
which round it is, what the round's cell starts from, and Conflict after the last round."""

from pathlib import Path

from reactor.kube.rebase import due, interrupted_round, next_round
from reactor.kube.resource import AgentTaskSpec, AgentTaskStatus
from reactor.workflow.types import TaskSpec

RESULT, ONTO, REPLAYED = "r" * 40, "o" * 40, "c" * 40
SPEC = AgentTaskSpec.model_validate({"prompt": "Set VALUE to 3", "repository": {"url": "file:///srv/app.git"},
                                     "test": {"command": "make test"}, "integrate": "queue"})


def status(phase: str = "Succeeded", rebases: int = 0, about: str = RESULT, state: str = "Ejected",
           reason: str = "TextualConflict") -> AgentTaskStatus:
    return AgentTaskStatus.read({
        "phase": phase, "rebases": rebases, "result": {"commit": RESULT, "pushed": True},
        "integration": {"state": state, "reason": reason, "commit": about, "conflictCommit": REPLAYED,
                        "onto": ONTO, "conflictPaths": ["shared.py"]}})


def test_a_textual_conflict_of_the_current_result_is_due_and_nothing_else_is():
    assert due(SPEC, status())
    assert not due(SPEC, status(about="e" * 40)), "an earlier round's result: not news"
    assert not due(SPEC, status(reason="SemanticConflict")), "the agent cannot rebase a failing test away"
    assert not due(SPEC, status(state="Integrated"))
    assert not due(SPEC, status(phase="Executing")), "a round is running already"
    assert not due(SPEC.model_copy(update={"integrate": "none"}), status())


def test_rounds_are_counted_and_the_task_ends_conflict_after_the_last():
    first = next_round(status(rebases=0), max_rounds=2)
    second = next_round(status(rebases=1), max_rounds=2)
    assert (first.number, second.number) == (1, 2)
    verdict = next_round(status(rebases=2), max_rounds=2)
    assert isinstance(verdict, str) and "after 2 rebase rounds" in verdict and "shared.py" in verdict
    assert isinstance(next_round(status(), max_rounds=0), str), "0 rounds: Conflict at once"


def test_a_round_starts_on_the_tip_from_the_conflicted_replay_on_a_branch_of_its_own():
    task = TaskSpec(task_id="b", prompt="Set VALUE to 3", repo=Path("/m"), base_branch="main",
                    start_commits=["p" * 40], started_at=12.0)
    round_task = next_round(status(rebases=1), 2).task(task)
    assert (round_task.start_commits, round_task.start_from) == ([ONTO], REPLAYED)
    assert round_task.branch == "reactor/b-rebase-2"
    assert round_task.prompt.startswith(f"Your earlier change for this task no longer applies to main: rebase it "
                                        f"onto {ONTO}") and "shared.py" in round_task.prompt
    assert round_task.prompt.endswith("The task was:\nSet VALUE to 3")


def test_a_round_an_operator_restart_cut_off_runs_again_as_the_same_round():
    assert interrupted_round(status(phase="Executing", rebases=1)).number == 1
    assert interrupted_round(status(phase="Pending", rebases=0)) is None, "the task's first run"
    assert interrupted_round(status(phase="Executing", rebases=1, state="Queued")) is None, "its result is queued"
