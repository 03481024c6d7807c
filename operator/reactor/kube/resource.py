"""The AgentTask custom resource: its identity and spec as Python types.

Field names mirror crds/agenttask.yaml; the API server has already validated the spec
against that schema, so parsing here is about types and defaults, not rejection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from reactor.workflow.types import Budget

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
