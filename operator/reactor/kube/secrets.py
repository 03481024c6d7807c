"""Reading a task's Secrets: at run time, into the cell's environment or git's, never stored
(not in status, events, logs or argv)."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, field

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from reactor.errors import ConfigurationError
from reactor.infra.mirrors import GitCredentials
from reactor.kube.resource import AgentTaskSpec, TaskRef


@dataclass(repr=False)
class TaskSecrets:
    env: dict[str, str] = field(default_factory=dict)  # for the opencode process only (API keys)
    git: GitCredentials | None = None  # for fetch and push

    def values(self) -> list[str]:
        """Every secret string, for redaction (transcripts, progress, the page)."""
        git = self.git
        extra = [git.password, git.ssh_private_key] if git is not None else []
        return [value for value in (*self.env.values(), *extra) if value]

    def __repr__(self) -> str:  # never show a secret
        return f"TaskSecrets(env=<{len(self.env)} keys>, git={'<set>' if self.git else None})"


class SecretReader:
    def __init__(self, api_client: k8s.ApiClient, operator_secrets: tuple[str, ...] = ()):
        """``operator_secrets``: Secrets of the operator's own kept in tenant namespaces (the
        default forge token, --forge-token-secret), which no task may name for its cell or git."""
        self.core = k8s.CoreV1Api(api_client)
        self.operator_secrets = frozenset(name for name in operator_secrets if name)

    async def for_task(self, ref: TaskRef, spec: AgentTaskSpec) -> TaskSecrets:
        """What the spec references. ConfigurationError, naming the field, for a Secret that
        does not exist or may not be read."""
        named = [(s.secret_ref.name, "spec.agent.envFrom") for s in spec.agent.env_from]
        if spec.repository.credentials_secret_ref is not None:
            named.append((spec.repository.credentials_secret_ref.name, "spec.repository.credentialsSecretRef"))
        for name, field_path in named:
            self.refuse_operator_secret(name, field_path)
        secrets = TaskSecrets()
        for source in spec.agent.env_from:
            data = await self.read(ref.namespace, source.secret_ref.name, "spec.agent.envFrom")
            secrets.env.update({source.prefix + key: value for key, value in data.items()})
        secret_ref = spec.repository.credentials_secret_ref
        if secret_ref is not None:
            data = await self.read(ref.namespace, secret_ref.name, "spec.repository.credentialsSecretRef")
            secrets.git = GitCredentials(username=data.get("username"), password=data.get("password"),
                                         ssh_private_key=data.get("ssh-privatekey"))
        return secrets

    def refuse_operator_secret(self, name: str, field_path: str) -> None:
        """ConfigurationError when a tenant's field names one of the operator's own Secrets
        (a cell's environment, or git for a host the tenant chooses, would receive it)."""
        if name in self.operator_secrets:
            raise ConfigurationError(f"{field_path}: secret {name!r} is the operator's forge token "
                                     "(--forge-token-secret), which never reaches a task's cell or git")

    async def read(self, namespace: str, name: str, field_path: str) -> dict[str, str]:
        try:
            secret = await asyncio.to_thread(self.core.read_namespaced_secret, name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                raise ConfigurationError(f"{field_path}: secret {name!r} not found in namespace {namespace}") from None
            if exc.status == 403:
                raise ConfigurationError(f"{field_path}: the operator may not read secret {name!r} "
                                         f"in namespace {namespace} (RBAC: secrets get)") from None
            raise
        return {key: base64.b64decode(value).decode() for key, value in (secret.data or {}).items()}
