"""What goes into a task and what comes out of it."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from reactor.opencode.models import Usage  # token/cost totals, as the server reports them


class Phase(str, enum.Enum):
    """Where a task is. Entered in this order (Reverting instead of Committing/Pushing when
    the change is thrown away; Pushing only where there is a remote to push to)."""

    PENDING = "Pending"
    BOOTSTRAPPING = "Bootstrapping"
    EXECUTING = "Executing"
    TESTING = "Testing"
    COMMITTING = "Committing"
    PUSHING = "Pushing"
    REVERTING = "Reverting"
    TEARING_DOWN = "TearingDown"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def terminal(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)

    @property
    def rank(self) -> int:
        """Position in the lifecycle: a later phase never gives way to an earlier one."""
        return _PHASE_RANK[self]


_PHASE_RANK = {phase: rank for rank, phase in enumerate(
    [Phase.PENDING, Phase.BOOTSTRAPPING, Phase.EXECUTING, Phase.TESTING, Phase.COMMITTING, Phase.PUSHING,
     Phase.REVERTING, Phase.TEARING_DOWN, Phase.SUCCEEDED, Phase.FAILED])}


class Outcome(str, enum.Enum):
    COMMITTED = "committed"  # tests passed, the change is a commit on the result branch
    REVERTED = "reverted"  # the agent changed something, tests failed, the change was thrown away
    FAILED = "failed"  # the task could not run to a test verdict


class Reason(str, enum.Enum):
    """Why a task is where it is: every reason Reactor reports (the Kubernetes condition
    reason, Events, `reactor run` output) comes from here."""

    # the task ended
    COMMITTED = "Committed"  # tests passed; committed (and pushed, where there is a remote)
    TESTS_FAILED = "TestsFailed"
    OUT_OF_MEMORY = "OutOfMemory"  # the test command outgrew the memory the operator's pod has
    TESTS_TIMED_OUT = "TestsTimedOut"  # the test command ran past its time limit
    TEST_COMMAND_NOT_FOUND = "TestCommandNotFound"  # exit 127
    TESTS_MODIFIED = "TestsModified"  # the agent changed a protected path
    NO_CHANGES = "NoChanges"
    TIMEOUT = "Timeout"  # the task's time box expired
    AGENT_STALLED = "AgentStalled"  # no progress for the stall timeout
    AGENT_ERROR = "AgentError"  # the model or the OpenCode server failed
    BOOT_FAILED = "BootFailed"  # no healthy server after BOOT_RETRY, or no free port
    FETCH_FAILED = "FetchFailed"  # the repository could not be fetched
    REPOSITORY_REFUSED = "RepositoryRefused"  # a URL with credentials, or a file:// path not allowed
    PUSH_FAILED = "PushFailed"  # committed, but the push was refused or failed
    INVALID_INPUT = "InvalidInput"  # a bad spec, flag, secret reference or base branch
    OPERATOR_RESTARTED = "OperatorRestarted"  # interrupted by operator restarts, no attempts left
    CANCELLED = "Cancelled"
    GIT_TIMED_OUT = "GitTimedOut"  # a git step in the checkout ran past its deadline (a filter that hangs?)
    REFS_TAMPERED = "RefsTampered"  # refs outside the task's branch moved, or the result is not the tested change
    BUDGET_EXCEEDED = "BudgetExceeded"  # the task's own maxCost/maxTokens
    SPEND_LIMIT_EXCEEDED = "SpendLimitExceeded"  # a limit over many tasks (the operator's SpendLimit)
    DEPENDENCY_FAILED = "DependencyFailed"  # a task it depends on failed, was deleted, or cannot be built on
    PARENTS_CONFLICT = "ParentsConflict"  # the results of the tasks it depends on do not merge
    CONFLICT = "Conflict"  # its result still conflicts with the base branch after the merge queue's rebase rounds
    INTERNAL_ERROR = "InternalError"
    # the task waits
    WAITING_FOR_CAPACITY = "WaitingForCapacity"  # all agents (--max-agents) busy
    WAITING_FOR_MEMORY = "WaitingForMemory"  # the memory limit cannot hold another cell's peak
    OPERATOR_SHUTDOWN = "OperatorShutdown"  # back to Pending; runs again when the operator restarts
    DEPENDENCIES_PENDING = "DependenciesPending"  # a task it depends on has not succeeded yet
    REBASING = "Rebasing"  # its queued result conflicts with the base's new tip: a cell reopens to rebase it


class Budget(BaseModel):
    """Limits on what one task may spend, checked after every model step while it runs."""

    max_cost: float | None = Field(default=None, ge=0)  # in the provider's currency (USD)
    max_tokens: int | None = Field(default=None, ge=1)  # input+output+reasoning+cache tokens

    @property
    def limited(self) -> bool:
        return self.max_cost is not None or self.max_tokens is not None


class TaskSpec(BaseModel):
    task_id: str
    prompt: str
    repo: Path
    description: str = ""
    base_branch: str = "main"
    # Commits the task builds on (its dependencies' results): none, it starts at the base
    # branch's tip; one, at that commit; several, at their merge (made by Reactor, see
    # infra.worktrees.integrate). Commits, not branch names: a branch may move.
    start_commits: list[str] = Field(default_factory=list)
    result_branch: str | None = None  # default reactor/<task_id>
    test_command: str | None = None  # default: detected from the repository
    test_timeout: float = 600.0
    model: str | None = None  # provider/model
    opencode_config: dict[str, Any] = Field(default_factory=dict)
    timeout: float = 1800.0  # the whole-task time box, counted from started_at
    # Wall-clock time (epoch seconds) of the task's first start; None: it starts now. A retry
    # after an operator restart carries it over, so the box is the task's, not the attempt's.
    started_at: float | None = None
    # Paths the agent must not change (.gitignore-style patterns, e.g. "tests/"): a change to
    # one fails the task with TestsModified and nothing is committed.
    protect: list[str] = Field(default_factory=list)
    budget: Budget = Field(default_factory=Budget)  # maxCost/maxTokens, enforced while it runs
    # A commit whose files are laid into the checkout (on the base branch's tip) before the
    # agent starts: a rebase round's earlier result replayed onto the new base, conflict
    # markers and all (made by the merge queue). None: the checkout is the base as it is.
    start_from: str | None = None
    # A green commit an earlier, lost run of this task recorded (a fleet replica that died
    # before its push): its files are laid into the checkout at the start commit, and a fresh
    # session gets the prompt and a summary of what that run did. The result is still one
    # commit on the start commit, tested here. None: a normal start.
    resumed_from: str | None = None
    # Environment of the opencode process only (API keys). Excluded from repr and dumps.
    env: dict[str, str] = Field(default_factory=dict, repr=False, exclude=True)

    @property
    def branch(self) -> str:
        return self.result_branch or f"reactor/{self.task_id}"

    @property
    def commit_message(self) -> str:
        return f"Task {self.task_id}: {self.description or self.prompt.splitlines()[0][:72]}"


class CellInfo(BaseModel):
    """Where a running cell lives; the operator records it to find orphans after a crash."""

    port: int | None = None
    worktree: str | None = None
    server_pid: int | None = None
    session_id: str | None = None
    start_commit: str | None = None  # the commit its checkout started from (a fleet's adopter checks a record against it)


class Attempt(BaseModel):
    """One try of the agent within a run (R3 retries and server restarts start a new one from a
    clean checkout): what became of it. The pull request's body lists them."""

    number: int
    outcome: str = "tried"  # tried (still running) | reverted | committed | failed
    note: str = ""


class TaskResult(BaseModel):
    task_id: str
    outcome: Outcome
    reason: Reason
    message: str
    branch: str | None = None
    base_branch: str | None = None
    start_commit: str | None = None  # the commit the cell started from (the result's parent)
    commit: str | None = None
    files_changed: list[str] = Field(default_factory=list)
    test_command: str | None = None
    test_exit_code: int | None = None
    test_output_tail: str = ""
    usage: Usage = Field(default_factory=Usage)
    phase_durations: dict[str, float] = Field(default_factory=dict)
    pushed: bool = False
    started_at: float | None = None
    duration: float = 0.0
    boot_attempts: int = 0
    prompt_attempts: int = 0
    attempts: list[Attempt] = Field(default_factory=list)  # each try of the agent and what became of it
    model: str | None = None  # provider/model the agent ran with (None: OpenCode's default)
    confined: bool = False  # whether the cell ran under Landlock (see docs/security.md)
    # Taken over from a run an operator killed mid-turn: "reopened" (its session, one
    # continuation message) or "restarted" (a fresh session on its checkout, or on the green
    # commit a lost replica recorded: ``resumed_from``); None otherwise.
    resumed: str | None = None
    resumed_from: str | None = None  # with resumed "restarted": the lost run's green commit it started from

    @property
    def succeeded(self) -> bool:
        return self.outcome is Outcome.COMMITTED


class PhaseEvent(BaseModel):
    """What the workflow reports: a phase entered (once each, in order), or with ``update``
    set, news within the current phase (a restarted server's new pid)."""

    task_id: str
    phase: Phase
    message: str = ""
    reason: Reason | None = None
    update: bool = False
    cell: CellInfo = Field(default_factory=CellInfo)
    started_at: float | None = None
    # With Pushing: what is being published (recorded first: a restart resumes from it);
    # with the terminal phase: the verdict.
    result: TaskResult | None = None
