"""Writes what the engine reports into an AgentTask's status subresource and Events.

One owner: a run's ``TaskStatus`` is the only writer of its task's status. It writes each
phase once, in the order the workflow enters them (one merge patch and one Event per
phase), the terminal phase with the result once, and nothing after it.

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

from reactor.kube.resource import GROUP, PLURAL, VERSION, TaskRef, format_time
from reactor.workflow.types import CellInfo, Phase, PhaseEvent, Reason, TaskResult

log = logging.getLogger(__name__)
COMPONENT = "reactor-operator"


def now() -> str:
    return format_time(dt.datetime.now(dt.timezone.utc).timestamp())


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


def result_status(result: TaskResult) -> dict[str, Any]:
    return {
        "outcome": result.outcome.value,
        "branch": result.branch,
        "startCommit": result.start_commit,
        "commit": result.commit,
        "shortCommit": result.commit[:7] if result.commit else None,
        "pushed": result.pushed,
        "filesChanged": result.files_changed,
        "testExitCode": result.test_exit_code,
        "testOutputTail": result.test_output_tail[-2000:],
        "resumed": result.resumed,
    }


def phase_status(phase: Phase, message: str, generation: int | None, reason: str | None = None) -> dict[str, Any]:
    """The fields every phase write sets: phase, message and the Succeeded condition."""
    condition_status = "Unknown" if not phase.terminal else ("True" if phase is Phase.SUCCEEDED else "False")
    return {
        "phase": phase.value,
        "message": message,
        "observedGeneration": generation,
        "conditions": [succeeded_condition(condition_status, reason or phase.value, message, generation)],
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
    def __init__(self, api_client: k8s.ApiClient, confinement: tuple[bool, str] = (False, ""), metrics: Any = None):
        self.confinement = confinement  # (confined, message), the same for every task of this operator
        self.custom = k8s.CustomObjectsApi(api_client)
        self.core = k8s.CoreV1Api(api_client)
        self._locks: dict[str, asyncio.Lock] = {}
        self.metrics = metrics  # reactor.observe.metrics.Metrics: counts the writes
        self.patches: dict[str, int] = {}  # per object uid: status writes made

    async def patch(self, ref: TaskRef, status: dict[str, Any]) -> bool:
        """Merge ``status`` into the object's status. False when the object is gone.
        Conditions always carry Confined beside Succeeded (a merge patch replaces the list)."""
        if "conditions" in status:
            status = {**status, "conditions": [*status["conditions"],
                                               confined_condition(*self.confinement, status.get("observedGeneration"))]}
        lock = self._locks.setdefault(ref.uid, asyncio.Lock())
        async with lock:  # keep one object's patches in the order they were made
            try:
                await self._send(ref, status)
                self.patches[ref.uid] = self.patches.get(ref.uid, 0) + 1
                if self.metrics is not None:
                    kind = "progress" if set(status) == {"progress"} else "phase"
                    self.metrics.status_patches.labels(kind).inc()
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

    async def _send(self, ref: TaskRef, status: dict[str, Any]) -> None:
        """The write itself: a merge patch of /status (a fleet replica's is fenced, see kube/fleet.py)."""
        await asyncio.to_thread(self.custom.patch_namespaced_custom_object_status,
                                GROUP, VERSION, ref.namespace, PLURAL, ref.name, {"status": status})

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



class TaskStatus:
    """The one writer of one run's status (see the module doc). ``report`` is the workflow's
    phase callback; ``finish`` and ``requeue`` are for verdicts the supervisor reaches
    without a run (a missing Secret, restarts used up) and for the operator stopping;
    ``waiting`` says why a task is held in Pending; ``write_progress`` is the live progress
    (the publisher's rate-limited writes), which also rides along with every phase write."""

    def __init__(self, writer: StatusWriter, ref: TaskRef, generation: int | None, attempt: int,
                 previous_result: dict[str, Any] | None = None):
        self.writer, self.ref, self.generation, self.attempt = writer, ref, generation, attempt
        self.previous_result = previous_result  # a resumed push: what the first run recorded
        self.previous_progress: dict[str, Any] | None = None  # an earlier attempt's spend
        self.phase: Phase | None = None
        self.waiting_reason: Reason | None = None
        self.waiting_detail: dict[str, Any] = {}
        # The parents (spec.dependsOn) this task saw, name -> uid, as its status recorded them.
        self.seen_parents: dict[str, str] = {}
        self.reopen_session: str | None = None  # an interrupted run's OpenCode session, to reopen
        self.observation: Any = None  # reactor.observe TaskObservation of the run, once it runs
        self.publisher: Any = None  # its ProgressPublisher

    def observe(self, observation: Any, publisher: Any) -> None:
        self.observation, self.publisher = observation, publisher

    @property
    def finished(self) -> bool:
        return self.phase is not None and self.phase.terminal

    async def report(self, event: PhaseEvent) -> None:
        if self.finished:
            return
        if event.phase.terminal:
            assert event.result is not None, "the terminal phase carries the verdict"
            await self.finish(event.result)
            return
        if event.update:  # news within the phase: where the cell lives now, no new phase or Event
            await self.writer.patch(self.ref, {"message": event.message, "cell": cell_status(event.cell, self.ref.cell_id)})
            return
        if self.observation is not None:
            self.observation.on_phase(event)
        status = phase_status(event.phase, event.message, self.generation, event.reason.value if event.reason else None)
        status["cell"] = cell_status(event.cell, self.ref.cell_id) if event.cell.worktree else None
        if self.publisher is not None:
            status["progress"] = self.publisher.taken()
        if event.phase is Phase.BOOTSTRAPPING:
            status["attempts"] = self.attempt
            if event.started_at is not None:
                status["startTime"] = format_time(event.started_at)
        if event.phase is Phase.PUSHING and event.result is not None:
            # Recorded before the push: an operator that dies now resumes at the push, with this commit.
            status["result"] = result_status(event.result)
        self.phase = event.phase
        await self.writer.patch(self.ref, status)
        await self.writer.event(self.ref, event.phase.value, event.message or event.phase.value)

    async def finish(self, result: TaskResult) -> None:
        if self.finished:
            return
        phase = Phase.SUCCEEDED if result.succeeded else Phase.FAILED
        outcome = result_status(result)
        if self.previous_result:  # keep what the first run recorded (files, test exit code)
            outcome = {**self.previous_result, **{k: v for k, v in outcome.items() if v not in (None, [], "")}}
        status = phase_status(phase, result.message, self.generation, result.reason.value)
        status.update(cell=None, waitingOn=None, completionTime=now(), result=outcome, usage=usage_status(result),
                      phaseDurations=result.phase_durations)
        if self.observation is not None:
            self.observation.finish(result, phase)
            status["progress"] = final_progress(self.observation.progress.snapshot(), result)
        self.phase = phase
        await self.writer.patch(self.ref, status)
        await self.writer.event(self.ref, phase.value, f"{result.reason.value}: {result.message}",
                                warning=not result.succeeded)

    async def requeue(self, reason: Reason, message: str) -> None:
        """Back to Pending (the operator stops): the task runs again on its next start."""
        if self.finished:
            return
        status = phase_status(Phase.PENDING, message, self.generation, reason.value)
        status["cell"] = None
        self.phase = Phase.PENDING
        await self.writer.patch(self.ref, status)
        await self.writer.event(self.ref, reason.value, message, warning=True)

    async def waiting(self, reason: Reason, message: str, **detail: Any) -> None:
        """Held in Pending, and why (capacity, memory, a SpendLimit, its dependencies): written
        when the reason (or its ``detail``, fields of status such as waitingOn) changes."""
        if self.finished or (self.phase is Phase.PENDING and self.waiting_reason is reason
                             and self.waiting_detail == detail):
            return
        status = phase_status(Phase.PENDING, message, self.generation, reason.value)
        status.update(detail)
        self.phase, self.waiting_reason, self.waiting_detail = Phase.PENDING, reason, detail
        await self.writer.patch(self.ref, status)
        await self.writer.event(self.ref, reason.value, message, warning=reason is Reason.SPEND_LIMIT_EXCEEDED)

    async def dependencies_met(self, dependencies: list[dict[str, Any]], message: str) -> None:
        """Its dependencies succeeded: nothing to wait on; which results it starts from."""
        if self.finished:
            return
        await self.writer.patch(self.ref, {"waitingOn": None, "dependencies": dependencies})
        await self.writer.event(self.ref, "DependenciesMet", message)

    async def write_progress(self, status: dict[str, Any]) -> None:
        """A live progress update, ``{"progress": ...}`` (never after the verdict: the final
        progress is in it)."""
        if not self.finished:
            await self.writer.patch(self.ref, status)


def final_progress(snapshot: dict[str, Any], result: TaskResult) -> dict[str, Any]:
    """The last progress: nothing running; spend as the server totals it (exact even when the
    event stream had gaps), unless the live count is higher (an earlier attempt's spend)."""
    usage = result.usage
    if usage.cost >= snapshot["cost"]:
        snapshot.update(inputTokens=usage.input_tokens, outputTokens=usage.output_tokens,
                        totalTokens=usage.total_tokens, cost=round(usage.cost, 6), costDisplay=f"${usage.cost:.4f}")
    snapshot.update(activity="", tool=None)
    return snapshot
