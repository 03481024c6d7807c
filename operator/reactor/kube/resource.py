"""The AgentTask custom resource: its identity and spec as Python types.

Field names mirror crds/agenttask.yaml; the API server has already validated the spec
against that schema, so parsing here is about types and defaults, not rejection.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from reactor.durations import parse_duration
from reactor.workflow.types import Budget, TaskSpec

GROUP, VERSION, PLURAL = "reactor.dev", "v1alpha1", "agenttasks"
SPENDLIMITS = "spendlimits"
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
    depends_on: list[str] = Field(default_factory=list, alias="dependsOn")
    resume: str = "reattach"  # after an operator crash mid-turn: reopen the agent's session, or "restart"

    def to_task_spec(self, ref: TaskRef, repo: Path, env: dict[str, str] | None = None,
                     started_at: float | None = None, start_from: list[str] | None = None) -> TaskSpec:
        """The engine's task: ``repo`` is the local repository (the operator's mirror of
        spec.repository.url), ``env`` the secrets for the cell, ``started_at`` the first
        start of an earlier attempt (the time box is the task's), ``start_from`` the result
        commits of the tasks it depends on."""
        return TaskSpec(
            task_id=self.task_id or ref.name, description=self.description, prompt=self.prompt, repo=repo,
            base_branch=self.repository.branch, result_branch=self.result_branch or f"reactor/{ref.name}",
            test_command=self.test.command, test_timeout=parse_duration(self.test.timeout),
            protect=self.test.protect, model=self.agent.model, opencode_config=self.agent.config,
            timeout=parse_duration(self.timeout), started_at=started_at, env=env or {},
            budget=self.budget.to_budget(), start_from=list(start_from or []),
        )


class SpendLimitSpec(_Spec):
    period: str = "Daily"  # Daily (UTC day) | Total (since creation)
    max_cost: str | None = Field(default=None, alias="maxCost")
    max_tokens: int | None = Field(default=None, alias="maxTokens")


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
