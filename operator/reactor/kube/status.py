"""Writes what the engine reports into an AgentTask's status subresource and Events.

One owner: a run's ``TaskStatus`` is the only writer of its task's status, with one replica
or many. It writes each phase once, in the order the workflow enters them (one patch and
one Event per phase), the terminal phase with the result once, and nothing after it; and,
in a fleet, the claim, why an unclaimed task waits, and the hand-back.

How a write reaches the API server depends on who owns the task (the supervisor's
ownership policy, kube/ownership.py):

- one replica: a JSON merge patch of /status, no resourceVersion (this operator is the
  only writer of these fields; kopf's bookkeeping lives in other keys);
- a fleet's claim holder: a JSON patch whose first operation tests ``/status/claim/holder``
  (``StatusWriter`` with a ``Fence``), so the API server refuses the write once another
  replica adopted the task; a refusal raises ``ClaimLost``;
- a write about a task nobody holds yet (the claim itself, why it waits): a merge patch
  carrying the resourceVersion that was read, so it is refused (``Conflict``) when anything
  changed meanwhile.

The kubernetes client is synchronous, so calls run in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
from collections.abc import Callable
from typing import Any, Protocol

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from reactor.kube.resource import GROUP, PLURAL, VERSION, AgentTaskStatus, ProgressStatus, TaskRef, format_time
from reactor.workflow.types import CellInfo, Phase, PhaseEvent, Reason, TaskResult

log = logging.getLogger(__name__)
COMPONENT = "reactor-operator"
JSON_PATCH = "application/json-patch+json"


class ClaimLost(Exception):
    """This replica no longer holds the task (adopted by another, or fenced): it must not
    write the task's status or push its result."""


class Conflict(Exception):
    """A write made on a version of the object that is not current any more (409)."""


class Fence(Protocol):
    """A fleet's claims, as the status writer needs them (kube/fleet.py ReplicaLeases)."""

    def holder_of(self, ref: TaskRef) -> str | None:
        """The claim holder the API server must still record for our write; None: not ours."""

    def holds(self, ref: TaskRef) -> bool:
        """Ours, as far as this replica knows (a local check)."""

    def lost(self, ref: TaskRef) -> None:
        """The API server says the task is someone else's now."""

    async def read(self, ref: TaskRef) -> dict | None:
        """The object as the API server has it now."""


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
            "sessionId": cell.session_id, "cellId": cell_id, "startCommit": cell.start_commit}


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
        "testCommand": result.test_command,
        "model": result.model,
        "attempts": [attempt.model_dump() for attempt in result.attempts],
        "confined": result.confined,
        "resumed": result.resumed,
        "resumedFrom": result.resumed_from,
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
    """The API calls behind every TaskStatus of this operator (see the module doc)."""

    def __init__(self, api_client: k8s.ApiClient, confinement: tuple[bool, str] = (False, ""), metrics: Any = None,
                 fence: Fence | None = None):
        self.confinement = confinement  # (confined, message), the same for every task of this operator
        self.custom = k8s.CustomObjectsApi(api_client)
        self.core = k8s.CoreV1Api(api_client)
        self.fence = fence  # a fleet: writes of a held task are refused once the claim moved
        self._locks: dict[str, asyncio.Lock] = {}
        self.metrics = metrics  # reactor.observe.metrics.Metrics: counts the writes
        self.patches: dict[str, int] = {}  # per object uid: status writes made

    async def patch(self, ref: TaskRef, status: dict[str, Any], *, on_version: str | None = None) -> bool:
        """Merge ``status`` into the object's status. False when the object is gone.
        ``on_version``: only onto this resourceVersion (else ``Conflict``), for a task nobody
        holds. Conditions always carry Confined beside Succeeded (a patch replaces the list)."""
        if "conditions" in status:
            status = {**status, "conditions": [*status["conditions"],
                                               confined_condition(*self.confinement, status.get("observedGeneration"))]}
        lock = self._locks.setdefault(ref.uid, asyncio.Lock())
        async with lock:  # keep one object's patches in the order they were made
            try:
                await self._send(ref, status, on_version)
                self.patches[ref.uid] = self.patches.get(ref.uid, 0) + 1
                if self.metrics is not None:
                    kind = "progress" if set(status) == {"progress"} else "phase"
                    self.metrics.status_patches.labels(kind).inc()
                return True
            except ApiException as exc:
                if exc.status == 404:
                    return False
                if exc.status == 409 and on_version is not None:
                    raise Conflict(f"{ref}: changed since version {on_version}") from None
                if exc.status == 403:
                    message = (f"RBAC: {_api_message(exc)}; grant `patch` on agenttasks/status in namespace "
                               f"{ref.namespace} (see manifests/rbac.yaml)")
                    log.error("%s: %s", ref, message)
                    await self.event(ref, "Forbidden", message, warning=True)
                    raise PermissionError(message) from None
                raise

    async def _send(self, ref: TaskRef, status: dict[str, Any], on_version: str | None) -> None:
        """The write itself (see the module doc for which one)."""
        if on_version is None and self.fence is not None:
            await self._send_fenced(ref, status)
            return
        body: dict[str, Any] = {"status": status}
        if on_version is not None:
            body["metadata"] = {"resourceVersion": on_version}
        await asyncio.to_thread(self.custom.patch_namespaced_custom_object_status,
                                GROUP, VERSION, ref.namespace, PLURAL, ref.name, body)

    async def _send_fenced(self, ref: TaskRef, status: dict[str, Any]) -> None:
        """A claim holder's write: applied only while the API server still records our claim
        (a JSON patch led by a `test` of /status/claim/holder). ClaimLost when it does not."""
        assert self.fence is not None
        holder = self.fence.holder_of(ref)
        if holder is None:
            self.fence.lost(ref)
            raise ClaimLost(f"{ref}: not held by this replica")
        operations: list[dict[str, Any]] = [{"op": "test", "path": "/status/claim/holder", "value": holder}]
        operations += json_patch_operations(status)
        try:
            await asyncio.to_thread(self.custom.patch_namespaced_custom_object_status, GROUP, VERSION,
                                    ref.namespace, PLURAL, ref.name, operations, _content_type=JSON_PATCH)
        except ApiException as exc:
            if exc.status == 422:
                # A failed `test` is a bare 422 "Invalid" with no details: look at the claim.
                current = AgentTaskStatus.of(await self.fence.read(ref) or {})
                if current.claim is None or current.claim.holder != holder:
                    self.fence.lost(ref)
                    raise ClaimLost(f"{ref}: the claim moved away from {holder}") from None
            raise

    async def event(self, ref: TaskRef, reason: str, message: str, warning: bool = False) -> None:
        """Post a core/v1 Event about the task (in a fleet only while we hold it). A failure
        to post is logged, not fatal (bookkeeping)."""
        if self.fence is not None and not self.fence.holds(ref):
            return
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



def json_patch_operations(status: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON-patch equivalent of merging ``status`` into /status, for the shapes the
    supervisor writes: each top-level key replaced whole, None removing it. `add` then
    `remove` removes a key whether or not it exists (a bare `remove` of a missing key fails)."""
    operations: list[dict[str, Any]] = []
    for key, value in status.items():
        path = f"/status/{_escape(key)}"
        if value is None:
            operations += [{"op": "add", "path": path, "value": {}}, {"op": "remove", "path": path}]
        else:
            operations.append({"op": "add", "path": path, "value": _without_none(value)})
    return operations


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")



Unclaimed = Callable[[], "dict[str, Any] | None"]


class TaskStatus:
    """The one writer of one task's status in this replica (see the module doc).

    - ``report``: the workflow's phase callback (each phase once, the verdict once);
    - ``finish``: a verdict reached without a run (a missing Secret, restarts used up, a bug);
    - ``waiting``: why the task is held in Pending (written when the reason changes);
    - ``write_progress``: the live progress (the publisher's rate-limited writes; it also
      rides along with every phase write);
    - ``requeue``: back to Pending and unclaimed (the operator stops);
    - a fleet's: ``claim`` (the first write of a holder, on the version read), ``release``
      (a deleted task's claim given up once its cell is gone).

    ``claimed``: the task is ours (always, with one replica); until then ``unclaimed()``
    gives the object to write "why it waits" onto, or None when this replica must not.
    """

    def __init__(self, writer: StatusWriter, ref: TaskRef, generation: int | None, attempt: int = 0, *,
                 claimed: bool = True, unclaimed: Unclaimed | None = None):
        self.writer, self.ref, self.generation, self.attempt = writer, ref, generation, attempt
        self.claimed, self.unclaimed = claimed, unclaimed
        self.previous_result: dict[str, Any] | None = None  # a resumed push: what the first run recorded
        self.previous_progress: ProgressStatus | None = None  # an earlier attempt's spend
        self.phase: Phase | None = None
        self.waiting_reason: Reason | None = None
        self.waiting_detail: dict[str, Any] = {}
        # The parents (spec.dependsOn) this task saw, name -> uid, as its status recorded them.
        self.seen_parents: dict[str, str] = {}
        self.reopen_session: str | None = None  # an interrupted run's OpenCode session, to reopen
        self.reattach: Any = None  # its cell, still running (infra.cellrecords.LiveCell): reattach instead
        self.observation: Any = None  # reactor.observe TaskObservation of the run, once it runs
        self.publisher: Any = None  # its ProgressPublisher
        # The object's conditions as last written (a merge patch replaces the whole list, so a
        # write of one condition carries the others): kept by every write, seeded on resume.
        self.conditions: list[dict[str, Any]] = []
        self.final: dict[str, Any] | None = None  # the verdict's status as written (the PR body reads it)

    def observe(self, observation: Any, publisher: Any) -> None:
        self.observation, self.publisher = observation, publisher

    @property
    def finished(self) -> bool:
        return self.phase is not None and self.phase.terminal

    async def claim(self, body: dict[str, Any], status: dict[str, Any]) -> bool:
        """A fleet's claim: ``status`` (with ``claim``) written onto the version of ``body``
        that was read. False when anything changed the object first (read again, decide again)."""
        try:
            written = await self.writer.patch(self.ref, status, on_version=body["metadata"]["resourceVersion"])
        except Conflict:
            return False
        if written:
            self.claimed = True
            self.attempt = int(status.get("attempts") or self.attempt)
        return written

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
        self.conditions = status["conditions"]
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
        self.conditions = status["conditions"]
        self.final = status
        await self.writer.patch(self.ref, status)
        await self.writer.event(self.ref, phase.value, f"{result.reason.value}: {result.message}",
                                warning=not result.succeeded)

    async def write_pull_request(self, pull_request: dict[str, Any] | None, opened: bool, reason: str,
                                 message: str) -> None:
        """The task's pull request (kube/pullrequests.py): ``status.pullRequest`` and the
        condition PullRequestOpened, written after the verdict (the only writes after it).
        An Event when the condition changes, not on every retry."""
        previous = next((c for c in self.conditions if c.get("type") == "PullRequestOpened"), None)
        status_text = "True" if opened else "False"
        changed = previous is None or previous.get("status") != status_text or previous.get("reason") != reason
        condition = {
            "type": "PullRequestOpened", "status": status_text, "reason": reason, "message": message[:1024],
            "observedGeneration": self.generation,
            "lastTransitionTime": now() if previous is None or previous.get("status") != status_text
            else previous.get("lastTransitionTime") or now(),
        }
        conditions = [c for c in self.conditions if c.get("type") not in ("PullRequestOpened", "Confined")]
        self.conditions = [*conditions, condition]
        status: dict[str, Any] = {"conditions": self.conditions, "observedGeneration": self.generation}
        if pull_request is not None:
            status["pullRequest"] = pull_request
        await self.writer.patch(self.ref, status)
        if changed:
            await self.writer.event(self.ref, reason, message, warning=not opened)

    async def rebase_round(self, number: int, message: str) -> None:
        """Its queued result conflicts with the base's new tip: the task runs again as rebase
        round ``number`` (kube/rebase.py), from Pending. The earlier result goes (its branch
        stays on the origin); the spend so far (progress) stays and keeps counting; the round
        has its own attempts and time box."""
        status = phase_status(Phase.PENDING, message, self.generation, Reason.REBASING.value)
        status.update(rebases=number, result=None, attempts=0, startTime=None, completionTime=None, cell=None,
                      waitingOn=None)
        self.phase, self.waiting_reason, self.waiting_detail = Phase.PENDING, Reason.REBASING, {}
        self.conditions = status["conditions"]
        await self.writer.patch(self.ref, status)
        await self.writer.event(self.ref, Reason.REBASING.value, message)

    async def conflict(self, message: str) -> None:
        """The verdict after the last rebase round: Failed, reason Conflict. The last result,
        usage and progress stay as they were written."""
        if self.finished:
            return
        status = phase_status(Phase.FAILED, message, self.generation, Reason.CONFLICT.value)
        status.update(cell=None, completionTime=now())
        self.phase, self.conditions, self.final = Phase.FAILED, status["conditions"], status
        await self.writer.patch(self.ref, status)
        await self.writer.event(self.ref, Phase.FAILED.value, f"{Reason.CONFLICT.value}: {message}", warning=True)

    async def requeue(self, reason: Reason, message: str) -> None:
        """Back to Pending and unclaimed (the operator stops): the task runs again on the next
        start, or at once on another replica of a fleet."""
        if self.finished or not self.claimed:
            return
        status = phase_status(Phase.PENDING, message, self.generation, reason.value)
        status.update(cell=None, claim=None)
        self.phase = Phase.PENDING
        await self.writer.patch(self.ref, status)
        await self.writer.event(self.ref, reason.value, message, warning=True)


    async def release(self) -> None:
        """A fleet's task being deleted: its cell is gone, the claim is given up, so whichever
        replica's delete handler runs next may let the object go."""
        if self.claimed:
            await self.writer.patch(self.ref, {"cell": None, "claim": None})

    async def waiting(self, reason: Reason, message: str, **detail: Any) -> None:
        """Held in Pending, and why (capacity, memory, a SpendLimit, its dependencies): written
        when the reason (or its ``detail``, fields of status such as waitingOn) changes."""
        if self.finished or (self.phase is Phase.PENDING and self.waiting_reason is reason
                             and self.waiting_detail == detail):
            return
        status = phase_status(Phase.PENDING, message, self.generation, reason.value)
        status.update(detail)
        if not self.claimed:
            await self._waiting_unclaimed(reason, status, detail)
            return
        self.phase, self.waiting_reason, self.waiting_detail = Phase.PENDING, reason, detail
        await self.writer.patch(self.ref, status)
        await self.writer.event(self.ref, reason.value, message, warning=reason is Reason.SPEND_LIMIT_EXCEEDED)

    async def _waiting_unclaimed(self, reason: Reason, status: dict[str, Any], detail: dict[str, Any]) -> None:
        """A task nobody holds says why it waits: the first replica to say it wins, and a claim
        made meanwhile is never overwritten (the write carries the version it saw). No Event:
        every replica waits for it."""
        body = self.unclaimed() if self.unclaimed is not None else None
        if body is None:
            return
        current = AgentTaskStatus.of(body)
        if not current.waiting:
            return
        if current.reason == reason.value and current.waiting_on == detail.get("waitingOn"):
            return
        with contextlib.suppress(Conflict):
            await self.writer.patch(self.ref, status, on_version=body["metadata"]["resourceVersion"])

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


class IntegrationStatus:
    """The one writer of ``status.integration`` of AgentTasks whose result entered a merge
    queue: the replica driving that queue (a finished task's run writes nothing more, and no
    other field is touched). A merge patch of that one key."""

    def __init__(self, api_client: k8s.ApiClient):
        self.custom = k8s.CustomObjectsApi(api_client)

    def write(self, namespace: str, name: str, uid: str, integration: dict[str, Any], about: str | None = None) -> bool:
        """Blocking. Only onto the object ``uid`` names (a JSON patch led by a `test` of it: a
        task deleted and made again under its name is another task). False when it is gone.
        ``about``: only while the task is Succeeded with this result commit (the supervisor
        may have taken it back for a rebase round, kube/rebase.py, which ends in a new result)."""
        operations = [{"op": "test", "path": "/metadata/uid", "value": uid}]
        if about is not None:
            operations += [{"op": "test", "path": "/status/phase", "value": "Succeeded"},
                           {"op": "test", "path": "/status/result/commit", "value": about}]
        operations += [{"op": "add", "path": "/status/integration",
                       "value": {k: v for k, v in integration.items() if v is not None}}]
        try:
            self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, operations,
                                                              _content_type="application/json-patch+json")
            return True
        except ApiException as exc:
            if exc.status in (404, 422):  # gone, or another object under that name now
                return False
            raise
