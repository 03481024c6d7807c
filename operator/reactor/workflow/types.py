"""What goes into a task and what comes out of it."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from reactor.opencode.models import Usage  # token/cost totals, as the server reports them


class Phase(str, enum.Enum):
    PENDING = "Pending"
    BOOTSTRAPPING = "Bootstrapping"
    EXECUTING = "Executing"
    TESTING = "Testing"
    COMMITTING = "Committing"
    REVERTING = "Reverting"
    TEARING_DOWN = "TearingDown"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def terminal(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)


class Outcome(str, enum.Enum):
    COMMITTED = "committed"  # tests passed, the change is a commit on the result branch
    REVERTED = "reverted"  # the agent changed something, tests failed, the change was thrown away
    FAILED = "failed"  # the task could not run to a test verdict


class Reason(str, enum.Enum):
    """Why a task ended; also the Kubernetes condition reason."""

    COMMITTED = "Committed"
    TESTS_FAILED = "TestsFailed"
    TEST_COMMAND_NOT_FOUND = "TestCommandNotFound"
    NO_CHANGES = "NoChanges"
    TIMEOUT = "Timeout"
    BOOT_FAILED = "BootFailed"
    AGENT_ERROR = "AgentError"
    INVALID_INPUT = "InvalidInput"
    CANCELLED = "Cancelled"
    PUSH_FAILED = "PushFailed"
    REFS_TAMPERED = "RefsTampered"  # refs outside the task's branch moved, or the result is not the tested change
    OPERATOR_RESTARTED = "OperatorRestarted"
    INTERNAL_ERROR = "InternalError"


class TaskSpec(BaseModel):
    task_id: str
    prompt: str
    repo: Path
    description: str = ""
    base_branch: str = "main"
    result_branch: str | None = None  # default reactor/<task_id>
    test_command: str | None = None  # default: detected from the repository
    test_timeout: float = 600.0
    model: str | None = None  # provider/model
    opencode_config: dict[str, Any] = Field(default_factory=dict)
    timeout: float = 1800.0  # the whole-task time box
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


class TaskResult(BaseModel):
    task_id: str
    outcome: Outcome
    reason: Reason
    message: str
    branch: str | None = None
    base_branch: str | None = None
    commit: str | None = None
    files_changed: list[str] = Field(default_factory=list)
    test_command: str | None = None
    test_exit_code: int | None = None
    test_output_tail: str = ""
    usage: Usage = Field(default_factory=Usage)
    phase_durations: dict[str, float] = Field(default_factory=dict)
    duration: float = 0.0
    boot_attempts: int = 0
    prompt_attempts: int = 0
    confined: bool = False  # whether the cell ran under Landlock (see docs/security.md)

    @property
    def succeeded(self) -> bool:
        return self.outcome is Outcome.COMMITTED


class PhaseEvent(BaseModel):
    task_id: str
    phase: Phase
    message: str = ""
    cell: CellInfo = Field(default_factory=CellInfo)
