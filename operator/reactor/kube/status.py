"""Writes what the engine reports into an AgentTask's status subresource and Events.

Status is written with JSON merge patches to /status (no resourceVersion: the operator
is the only writer of these fields, and kopf's own bookkeeping lives in other keys).
The kubernetes client is synchronous, so calls run in a thread.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from reactor.kube.resource import GROUP, PLURAL, VERSION, TaskRef
from reactor.workflow.types import CellInfo, Phase, TaskResult

log = logging.getLogger(__name__)
COMPONENT = "reactor-operator"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def succeeded_condition(status: str, reason: str, message: str, generation: int | None) -> dict[str, Any]:
    return {
        "type": "Succeeded",
        "status": status,
        "reason": reason,
        "message": message[:1024],
        "observedGeneration": generation,
        "lastTransitionTime": now(),
    }


def cell_status(cell: CellInfo, cell_id: str) -> dict[str, Any]:
    return {"port": cell.port, "worktree": cell.worktree, "serverPid": cell.server_pid,
            "sessionId": cell.session_id, "cellId": cell_id}


def result_status(result: TaskResult, pushed: bool) -> dict[str, Any]:
    return {
        "outcome": result.outcome.value,
        "branch": result.branch,
        "commit": result.commit,
        "shortCommit": result.commit[:7] if result.commit else None,
        "pushed": pushed,
        "filesChanged": result.files_changed,
        "testExitCode": result.test_exit_code,
        "testOutputTail": result.test_output_tail[-2000:],
    }


def usage_status(result: TaskResult) -> dict[str, Any]:
    usage = result.usage
    return {
        "inputTokens": usage.input_tokens, "outputTokens": usage.output_tokens,
        "reasoningTokens": usage.reasoning_tokens, "cacheReadTokens": usage.cache_read_tokens,
        "cacheWriteTokens": usage.cache_write_tokens, "cost": usage.cost, "costDisplay": f"${usage.cost:.4f}",
    }


def _api_message(exc: ApiException) -> str:
    """The API server's own explanation (it names the user, verb, resource and namespace)."""
    try:
        return json.loads(exc.body)["message"]
    except (TypeError, ValueError, KeyError):
        return f"{exc.status} {exc.reason}"


def confined_condition(confined: bool, message: str, generation: int | None) -> dict[str, Any]:
    """Whether the task's cell runs under Landlock: never a silent downgrade."""
    return {
        "type": "Confined",
        "status": "True" if confined else "False",
        "reason": "Landlock" if confined else "Unconfined",
        "message": message[:1024],
        "observedGeneration": generation,
        "lastTransitionTime": now(),
    }


class StatusWriter:
    def __init__(self, api_client: k8s.ApiClient, confinement: tuple[bool, str] = (False, "")):
        self.confinement = confinement  # (confined, message), the same for every task of this operator
        self.custom = k8s.CustomObjectsApi(api_client)
        self.core = k8s.CoreV1Api(api_client)
        self._locks: dict[str, asyncio.Lock] = {}

    async def patch(self, ref: TaskRef, status: dict[str, Any]) -> bool:
        """Merge ``status`` into the object's status. False when the object is gone."""
        lock = self._locks.setdefault(ref.uid, asyncio.Lock())
        async with lock:  # keep one object's patches in the order they were made
            try:
                await asyncio.to_thread(
                    self.custom.patch_namespaced_custom_object_status,
                    GROUP, VERSION, ref.namespace, PLURAL, ref.name, {"status": status},
                )
                return True
            except ApiException as exc:
                if exc.status == 404:
                    return False
                if exc.status == 403:
                    message = (f"RBAC: {_api_message(exc)}; grant `patch` on agenttasks/status in namespace "
                               f"{ref.namespace} (see manifests/rbac.yaml)")
                    log.error("%s: %s", ref, message)
                    await self.event(ref, "Forbidden", message, warning=True)
                    raise PermissionError(message) from None
                raise

    async def phase(self, ref: TaskRef, phase: Phase, message: str, generation: int | None,
                    reason: str | None = None, **extra: Any) -> bool:
        condition_status = "Unknown" if not phase.terminal else ("True" if phase is Phase.SUCCEEDED else "False")
        status = {
            "phase": phase.value,
            "message": message,
            "observedGeneration": generation,
            "conditions": [succeeded_condition(condition_status, reason or phase.value, message, generation),
                           confined_condition(*self.confinement, generation)],
            **extra,
        }
        return await self.patch(ref, status)

    async def event(self, ref: TaskRef, reason: str, message: str, warning: bool = False) -> None:
        """Post a core/v1 Event about the task. IG: an event that cannot be posted is logged."""
        timestamp = dt.datetime.now(dt.timezone.utc)
        body = k8s.CoreV1Event(
            metadata=k8s.V1ObjectMeta(generate_name=f"{ref.name}.", namespace=ref.namespace),
            involved_object=k8s.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}", kind="AgentTask", name=ref.name, namespace=ref.namespace, uid=ref.uid,
            ),
            reason=reason,
            message=message[:1024],
            type="Warning" if warning else "Normal",
            source=k8s.V1EventSource(component=COMPONENT),
            reporting_component=COMPONENT,
            reporting_instance=COMPONENT,
            first_timestamp=timestamp,
            last_timestamp=timestamp,
            event_time=None,
            count=1,
        )
        try:
            await asyncio.to_thread(self.core.create_namespaced_event, ref.namespace, body)
        except ApiException as exc:
            log.warning("%s: cannot post event %s: %s %s", ref, reason, exc.status, exc.reason)

