"""The AgentTask custom resource: its identity and spec as Python types.

Field names mirror crds/agenttask.yaml; the API server has already validated the spec
against that schema, so parsing here is about types and defaults, not rejection.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reactor.durations import parse_duration
from reactor.workflow.types import Budget, Phase, TaskSpec

GROUP, VERSION, PLURAL = "reactor.dev", "v1alpha1", "agenttasks"
SPENDLIMITS = "spendlimits"
MERGEQUEUES = "mergequeues"
FINALIZER = "reactor.dev/cleanup"


class _Spec(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")


class SecretRef(_Spec):
    name: str


class EnvFromSource(_Spec):
    secret_ref: SecretRef = Field(alias="secretRef")
    prefix: str = ""


class RepositorySpec(_Spec):
    url: str
    branch: str = "main"
    push: bool = True
    credentials_secret_ref: SecretRef | None = Field(default=None, alias="credentialsSecretRef")


class TestSpec(_Spec):
    command: str
    timeout: str = "10m"
    protect: list[str] = Field(default_factory=list)


class AgentSpec(_Spec):
    model: str | None = None
    env_from: list[EnvFromSource] = Field(default_factory=list, alias="envFrom")
    config: dict[str, Any] = Field(default_factory=dict)


class BudgetSpec(_Spec):
    max_cost: str | None = Field(default=None, alias="maxCost")  # dollars as a string ("2.50")
    max_tokens: int | None = Field(default=None, alias="maxTokens")

    def to_budget(self) -> Budget:
        return Budget(max_cost=float(self.max_cost) if self.max_cost is not None else None,
                      max_tokens=self.max_tokens)


class TokenSecretRef(_Spec):
    name: str
    key: str = "token"


class ResultSpec(_Spec):
    kind: str = "branch"  # branch | pullRequest
    draft: bool = False
    forge: str | None = None  # gitea | github; None: told from the repository URL
    token_secret_ref: TokenSecretRef | None = Field(default=None, alias="tokenSecretRef")

    @property
    def pull_request(self) -> bool:
        return self.kind == "pullRequest"


class AgentTaskSpec(_Spec):
    prompt: str
    repository: RepositorySpec
    test: TestSpec
    task_id: str | None = Field(default=None, alias="taskId")
    description: str = ""
    result_branch: str | None = Field(default=None, alias="resultBranch")
    agent: AgentSpec = Field(default_factory=AgentSpec)
    timeout: str = "30m"
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    result: ResultSpec = Field(default_factory=ResultSpec)
    integrate: str = "none"  # none | queue: the pushed result enters its branch's MergeQueue
    depends_on: list[str] = Field(default_factory=list, alias="dependsOn")
    resume: str = "reattach"  # after an operator crash mid-turn: reopen the agent's session, or "restart"

    def to_task_spec(self, ref: TaskRef, repo: Path, env: dict[str, str] | None = None,
                     started_at: float | None = None, start_commits: list[str] | None = None) -> TaskSpec:
        """The engine's task: ``repo`` is the local repository (the operator's mirror of
        spec.repository.url), ``env`` the secrets for the cell, ``started_at`` the first
        start of an earlier attempt (the time box is the task's), ``start_commits`` the result
        commits of the tasks it depends on (spec.dependsOn)."""
        return TaskSpec(
            task_id=self.task_id or ref.name, description=self.description, prompt=self.prompt, repo=repo,
            base_branch=self.repository.branch, result_branch=self.result_branch or f"reactor/{ref.name}",
            test_command=self.test.command, test_timeout=parse_duration(self.test.timeout),
            protect=self.test.protect, model=self.agent.model, opencode_config=self.agent.config,
            timeout=parse_duration(self.timeout), started_at=started_at, env=env or {},
            budget=self.budget.to_budget(), start_commits=list(start_commits or []),
        )


class SpendLimitSpec(_Spec):
    period: str = "Daily"  # Daily (UTC day) | Total (since creation)
    max_cost: str | None = Field(default=None, alias="maxCost")
    max_tokens: int | None = Field(default=None, alias="maxTokens")


class _Status(BaseModel):
    """What the operator wrote (read back): every field optional; unknown ones kept."""

    model_config = ConfigDict(populate_by_name=True, extra="allow")

    @classmethod
    def read(cls, data: dict[str, Any]):
        """Parse a status read back; a field that does not parse (a hand-edited status) is
        left out rather than failing every handler that looks at the object."""
        data = dict(data)
        for _ in range(len(data) + 1):
            try:
                return cls.model_validate(data)
            except ValidationError as exc:
                bad = {error["loc"][0] for error in exc.errors() if error["loc"]}
                if not bad & set(data):
                    raise
                for key in bad:
                    data.pop(key, None)
        return cls.model_validate({})


class ClaimStatus(_Status):
    replica: str | None = None  # the StatefulSet pod name of the replica that runs the task
    holder: str | None = None  # its incarnation when it claimed (see kube/fleet.py)
    since: str | None = None


class CellStatus(_Status):
    port: int | None = None
    worktree: str | None = None
    server_pid: int | None = Field(default=None, alias="serverPid")
    session_id: str | None = Field(default=None, alias="sessionId")
    cell_id: str | None = Field(default=None, alias="cellId")
    start_commit: str | None = Field(default=None, alias="startCommit")  # what its checkout started from


class AttemptStatus(_Status):
    """One try of the agent within a run (``status.result.attempts``; the PR body lists them)."""

    number: int | None = None
    outcome: str = ""
    note: str = ""


class ResultStatus(_Status):
    outcome: str | None = None
    branch: str | None = None
    commit: str | None = None
    short_commit: str | None = Field(default=None, alias="shortCommit")
    pushed: bool | None = None
    files_changed: list[str] = Field(default_factory=list, alias="filesChanged")
    test_exit_code: int | None = Field(default=None, alias="testExitCode")
    test_output_tail: str | None = Field(default=None, alias="testOutputTail")
    start_commit: str | None = Field(default=None, alias="startCommit")  # the commit the cell started from
    resumed: str | None = None  # reopened | restarted: taken over from a run an operator crash cut off
    resumed_from: str | None = Field(default=None, alias="resumedFrom")  # a lost replica's green commit
    test_command: str | None = Field(default=None, alias="testCommand")
    model: str | None = None
    attempts: list[AttemptStatus] | None = None
    confined: bool | None = None  # whether the cell ran under Landlock

    def as_written(self) -> dict[str, Any]:
        """The fields as the status holds them (to carry a first run's result into a resumed one)."""
        return self.model_dump(by_alias=True, exclude_none=True)


class UsageStatus(_Status):
    input_tokens: int = Field(default=0, alias="inputTokens")
    output_tokens: int = Field(default=0, alias="outputTokens")
    reasoning_tokens: int = Field(default=0, alias="reasoningTokens")
    cache_read_tokens: int = Field(default=0, alias="cacheReadTokens")
    cache_write_tokens: int = Field(default=0, alias="cacheWriteTokens")
    cost: float = 0.0

    @property
    def total_tokens(self) -> int:
        return (self.input_tokens + self.output_tokens + self.reasoning_tokens + self.cache_read_tokens
                + self.cache_write_tokens)


class ProgressStatus(_Status):
    """``status.progress`` (written from reactor.observe.progress's snapshot; read back for
    what an earlier attempt spent)."""

    input_tokens: int = Field(default=0, alias="inputTokens")
    output_tokens: int = Field(default=0, alias="outputTokens")
    total_tokens: int = Field(default=0, alias="totalTokens")
    cost: float = 0.0
    steps: int = 0


class Condition(_Status):
    type: str
    status: str | None = None
    reason: str | None = None
    message: str | None = None


class PullRequestStatus(_Status):
    """The task's pull request (kube/pullrequests.py)."""

    url: str | None = None
    number: int | None = None
    head_commit: str | None = Field(default=None, alias="headCommit")
    state: str = ""
    base: str | None = None  # the branch it targets (a stacked PR: its parent's, until that integrates)


class DependencyStatus(_Status):
    """One parent (spec.dependsOn) as the dependent saw it: its uid (a parent created again
    under the same name is another task) and, once it succeeded, its result commit."""

    name: str
    uid: str = ""
    commit: str | None = None


class IntegrationStatusRead(_Status):
    """``status.integration`` as read back (written by the merge queue's driver, kube/mergequeues.py)."""

    state: str | None = None  # Queued | Integrating | Integrated | Ejected
    queue: str | None = None
    reason: str | None = None
    commit: str | None = None  # the result this is about
    conflict_commit: str | None = Field(default=None, alias="conflictCommit")
    onto: str | None = None  # TextualConflict: the base tip the result was replayed onto
    conflict_paths: list[str] = Field(default_factory=list, alias="conflictPaths")


class AgentTaskStatus(_Status):
    """An AgentTask's status as read from the API server (written by kube/status.py)."""

    phase: Phase | None = None
    message: str | None = None
    attempts: int = 0
    start_time: str | None = Field(default=None, alias="startTime")
    completion_time: str | None = Field(default=None, alias="completionTime")
    conditions: list[Condition] = Field(default_factory=list)
    claim: ClaimStatus | None = None
    cell: CellStatus | None = None
    result: ResultStatus | None = None
    usage: UsageStatus | None = None
    progress: ProgressStatus | None = None
    pull_request: PullRequestStatus | None = Field(default=None, alias="pullRequest")
    waiting_on: str | None = Field(default=None, alias="waitingOn")  # parents not done yet (DependenciesPending)
    dependencies: list[DependencyStatus] = Field(default_factory=list)
    integration: IntegrationStatusRead | None = None
    rebases: int = 0  # rebase rounds started for the merge queue (kube/rebase.py)

    @classmethod
    def of(cls, body: Any) -> AgentTaskStatus:
        return cls.read(body.get("status") or {})

    @property
    def finished(self) -> bool:
        return self.phase is not None and self.phase.terminal

    @property
    def waiting(self) -> bool:
        """Not started yet, or handed back (Pending)."""
        return self.phase in (None, Phase.PENDING)

    @property
    def reason(self) -> str | None:
        """The reason of the Succeeded condition (why the task is where it is)."""
        return next((c.reason for c in self.conditions if c.type == "Succeeded"), None)

    @property
    def commit(self) -> str | None:
        return self.result.commit if self.result is not None else None

    def conditions_as_written(self) -> list[dict[str, Any]]:
        """The conditions as the status holds them (for a writer that takes a finished task up)."""
        return [c.model_dump(by_alias=True, exclude_none=True) for c in self.conditions]


class ReplicaSpend(_Status):
    period: str = ""
    spent_cost: float = Field(default=0.0, alias="spentCost")
    spent_tokens: int = Field(default=0, alias="spentTokens")


class SpendLimitStatus(_Status):
    """A SpendLimit's status as read back: the period's spend, and each replica's own count
    (a fleet's replicas each write only their own entry)."""

    period: str = ""
    spent_cost: float = Field(default=0.0, alias="spentCost")
    spent_tokens: int = Field(default=0, alias="spentTokens")
    replicas: dict[str, ReplicaSpend] = Field(default_factory=dict)

    @classmethod
    def of(cls, body: Any) -> SpendLimitStatus:
        status = dict(body.get("status") or {})
        # An entry that is not an object (hand-edited) counts as nothing, not as an error.
        status["replicas"] = {k: v for k, v in (status.get("replicas") or {}).items() if isinstance(v, dict)}
        return cls.read(status)


class QueueRepositorySpec(_Spec):
    url: str
    branch: str = "main"
    credentials_secret_ref: SecretRef | None = Field(default=None, alias="credentialsSecretRef")


class QueueTestSpec(_Spec):
    command: str | None = None
    timeout: str = "10m"


class MergeQueueSpec(_Spec):
    repository: QueueRepositorySpec
    max_batch: int = Field(default=4, alias="maxBatch")
    max_parallel: int = Field(default=1, alias="maxParallel")
    merge_method: str = Field(default="rebase", alias="mergeMethod")
    test: QueueTestSpec = Field(default_factory=QueueTestSpec)

    def takes(self, task: AgentTaskSpec) -> bool:
        """A task's pushed result enters this queue."""
        return (task.integrate == "queue" and task.repository.url == self.repository.url
                and task.repository.branch == self.repository.branch)


@dataclass(frozen=True)
class TaskRef:
    """Which object a cell belongs to."""

    namespace: str
    name: str
    uid: str
    creation: str  # metadata.creationTimestamp: capacity is granted in this order

    @classmethod
    def from_body(cls, body: Any) -> TaskRef:
        meta = body["metadata"]
        return cls(meta["namespace"], meta["name"], meta["uid"], meta.get("creationTimestamp") or "")

    @property
    def cell_id(self) -> str:
        """Unique per object, readable in `ps e` and on disk."""
        return f"{self.namespace}.{self.name}.{self.uid[:8]}"

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # metav1.Time: RFC 3339, seconds, UTC


def format_time(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime(TIMESTAMP_FORMAT)


def parse_time(text: str | None) -> float | None:
    """Epoch seconds of a metav1.Time, or None when absent or unreadable."""
    if not text:
        return None
    try:
        return dt.datetime.strptime(text, TIMESTAMP_FORMAT).replace(tzinfo=dt.timezone.utc).timestamp()
    except ValueError:
        return None
