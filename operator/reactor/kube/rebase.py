"""A queued result that no longer applies goes back to its own task: the rebase rounds.

The merge queue's driver ejects a result that conflicts textually with the base branch's
tip (``status.integration``: Ejected, TextualConflict, with the result replayed onto that
tip, conflict markers and all, as ``conflictCommit``). The supervisor, the one owner of a
task's runs, then runs the task again as a *rebase round*: a cell on that tip whose
checkout starts from the conflicted replay, the rebase prompt, its own result branch and
time box; the spend keeps counting from the rounds before (spec.budget covers them all).
Green, it is pushed and re-enters the queue as any result does. A result that still
conflicts after ``max_rounds`` rounds ends the task Failed with reason Conflict.

Rules only, no Kubernetes calls: what the status says is decided here, the supervisor acts.
"""

from __future__ import annotations

from dataclasses import dataclass

from reactor.kube.resource import AgentTaskSpec, AgentTaskStatus
from reactor.mergequeue import rebase_prompt
from reactor.workflow.types import Phase, TaskSpec

DEFAULT_REBASE_ROUNDS = 2  # `reactor operator --rebase-rounds`
TEXTUAL_CONFLICT = "TextualConflict"


@dataclass(frozen=True)
class RebaseRound:
    number: int  # 1 for the first rebase (the task's second pass through the queue)
    onto: str  # the base tip the result was replayed onto: the round's cell starts there
    conflict_commit: str  # that replay, conflict markers in ``paths``: the checkout's files
    paths: tuple[str, ...]

    def task(self, task: TaskSpec) -> TaskSpec:
        """The engine's task for this round, from the task's own."""
        return task.model_copy(update={
            "prompt": rebase_prompt(task.prompt, task.base_branch, self.onto, list(self.paths)),
            "start_commits": [self.onto], "start_from": self.conflict_commit,
            # A branch of its own: the earlier result's branch is on the origin already.
            "result_branch": f"{task.branch}-rebase-{self.number}"})


def _conflict(status: AgentTaskStatus) -> tuple[str, str, tuple[str, ...]] | None:
    integration = status.integration
    if (integration is None or integration.state != "Ejected" or integration.reason != TEXTUAL_CONFLICT
            or not integration.conflict_commit or not integration.onto):
        return None
    return integration.onto, integration.conflict_commit, tuple(integration.conflict_paths)


def due(spec: AgentTaskSpec, status: AgentTaskStatus) -> bool:
    """The task's current result was ejected for a textual conflict: a round (or the
    Conflict verdict) is due. Only about the result the task holds now (an ejection of an
    earlier round's result is not news)."""
    return (spec.integrate == "queue" and status.phase is Phase.SUCCEEDED and _conflict(status) is not None
            and status.integration is not None and status.integration.commit == status.commit)


def next_round(status: AgentTaskStatus, max_rounds: int) -> RebaseRound | str:
    """The round to run now, or, when ``max_rounds`` have been run, the Conflict verdict's
    message. Call only when ``due``."""
    conflict = _conflict(status)
    assert conflict is not None, "no textual conflict to rebase"
    onto, commit, paths = conflict
    if status.rebases >= max_rounds:
        rounds = f"{status.rebases} rebase round{'s' if status.rebases != 1 else ''}"
        return (f"the result still conflicts with the base branch at {onto[:12]} in {', '.join(paths) or 'the tree'} "
                f"after {rounds}; it was not integrated")
    return RebaseRound(status.rebases + 1, onto, commit, paths)


def interrupted_round(status: AgentTaskStatus) -> RebaseRound | None:
    """A round that was started and not finished (the operator restarted mid-round): it runs
    again as the same round."""
    conflict = _conflict(status)
    if status.rebases < 1 or status.finished or conflict is None:
        return None
    return RebaseRound(status.rebases, *conflict)
