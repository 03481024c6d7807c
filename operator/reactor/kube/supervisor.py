"""Runs AgentTasks: one asyncio task per object, outside kopf's handlers.

Handlers only hand objects over (admit, resume, stop), so a long task never delays its
own deletion (kopf #936), and deletion works the same whether or not a run is in memory:
a delete with nothing running (the operator restarted meanwhile) reaps the recorded cell.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from reactor.durations import parse_duration
from reactor.errors import ConfigurationError, ReactorError
from reactor.infra.mirrors import GitCredentials, RepositoryMirrors, redact_url
from reactor.infra.processes import is_marked_for, kill_process_group
from reactor.kube.resource import AgentTaskSpec, TaskRef
from reactor.kube.status import StatusWriter, cell_status, now, result_status, usage_status
from reactor.workflow.engine import Engine
from reactor.workflow.tcr import run_task
from reactor.workflow.types import Outcome, Phase, PhaseEvent, Reason, TaskResult, TaskSpec

log = logging.getLogger(__name__)

# A run interrupted by an operator crash is started once more; after that it fails with
# reason OperatorRestarted instead of looping.
MAX_ATTEMPTS = 2
TERMINAL = (Phase.SUCCEEDED.value, Phase.FAILED.value)


class TaskSupervisor:
    def __init__(self, engine: Engine, api_client: k8s.ApiClient):
        self.engine = engine
        self.status = StatusWriter(api_client)
        self.core = k8s.CoreV1Api(api_client)
        self.mirrors = RepositoryMirrors(engine.work_dir / "mirrors")
        self._runs: dict[str, asyncio.Task] = {}
        self._stopping = False

    # -- what the handlers call --

    async def admit(self, body: Any) -> None:
        """A new AgentTask: start it. Its first status write is Bootstrapping, or Pending
        with reason WaitingForCapacity when it must wait (no write in between: latency)."""
        if (body.get("status") or {}).get("phase") in TERMINAL or body["metadata"]["uid"] in self._runs:
            return
        self._start(body, attempt=1)

    async def resume(self, body: Any) -> None:
        """The operator (re)started and finds this object. A finished task is left alone; an
        interrupted one has its orphaned cell reaped and is retried or failed."""
        ref = TaskRef.from_body(body)
        status = body.get("status") or {}
        phase = status.get("phase")
        if phase in TERMINAL or ref.uid in self._runs:
            return
        attempts = int(status.get("attempts") or 0)
        if phase in (None, Phase.PENDING.value):
            self._start(body, attempt=attempts + 1)
            return
        await self.reap(ref, status)
        generation = body["metadata"].get("generation")
        if attempts < MAX_ATTEMPTS:
            message = f"operator restarted during {phase}; orphaned cell cleaned up, running again"
            await self.status.event(ref, "Retrying", message, warning=True)
            await self.status.phase(ref, Phase.PENDING, message, generation, reason="OperatorRestarted", cell=None)
            self._start(body, attempt=attempts + 1)
        else:
            message = f"operator restarted during {phase}; orphaned cell cleaned up; no attempts left"
            await self.status.phase(ref, Phase.FAILED, message, generation, reason="OperatorRestarted",
                                    cell=None, completionTime=now())
            await self.status.event(ref, "Failed", message, warning=True)

    async def start(self) -> None:
        """After the startup sweep, before the first task (a fleet replica joins here)."""

    async def stop(self, body: Any) -> str | None:
        """The object is being deleted: stop its run at once and leave nothing behind.
        Returns why deletion must wait (a fleet: another replica still runs the cell), or None."""
        ref = TaskRef.from_body(body)
        run = self._runs.get(ref.uid)
        if run is not None:
            run.cancel()
            await asyncio.wait([run])  # the run tears its cell down before it ends
        await self.reap(ref, body.get("status") or {})
        return None

    async def shutdown(self) -> None:
        """Operator stopping: stop every cell; the tasks go back to Pending and run again on
        the next start."""
        self._stopping = True
        runs = list(self._runs.values())
        for run in runs:
            run.cancel()
        if runs:
            await asyncio.wait(runs)

    # -- running --

    def _start(self, body: Any, attempt: int) -> None:
        ref = TaskRef.from_body(body)
        generation = body["metadata"].get("generation")
        run = asyncio.create_task(self._run(ref, body["spec"], generation, attempt), name=f"agenttask {ref}")
        self._runs[ref.uid] = run
        run.add_done_callback(lambda done: self._runs.pop(ref.uid, None) if self._runs.get(ref.uid) is done else None)

    async def _run(self, ref: TaskRef, raw_spec: dict, generation: int | None, attempt: int) -> None:
        try:
            async def waiting(reason: str, message: str) -> None:  # WaitingForCapacity or WaitingForMemory
                await self.status.phase(ref, Phase.PENDING, message, generation, reason=reason)

            async with self.engine.capacity.slot((ref.creation, ref.namespace, ref.name), on_reason=waiting):
                result, pushed = await self._execute(ref, AgentTaskSpec.model_validate(raw_spec), generation, attempt)
            await self._finish(ref, result, pushed, generation)
        except asyncio.CancelledError:
            if self._stopping:
                await self.status.phase(ref, Phase.PENDING, "operator stopped; the task runs again when it restarts",
                                        generation, reason="OperatorShutdown", cell=None)
            raise
        except Exception as exc:  # a bug must end the task visibly, not leave it hanging
            log.exception("%s: internal error", ref)
            with contextlib.suppress(Exception):  # e.g. the status write itself was forbidden
                await self.status.phase(ref, Phase.FAILED, f"internal error: {exc}", generation,
                                        reason=Reason.INTERNAL_ERROR.value, cell=None, completionTime=now())

    async def _execute(self, ref: TaskRef, spec: AgentTaskSpec, generation: int | None,
                       attempt: int) -> tuple[TaskResult, bool]:
        await self.status.phase(ref, Phase.BOOTSTRAPPING, f"fetching {redact_url(spec.repository.url)}", generation,
                                startTime=now(), attempts=attempt)
        await self.status.event(ref, Phase.BOOTSTRAPPING.value, f"attempt {attempt}: fetching repository")
        task_id = spec.task_id or ref.name
        try:
            env = await self._secret_env(ref, spec)
            credentials = await self._credentials(ref, spec)
            mirror = await asyncio.to_thread(self.mirrors.sync, spec.repository.url, credentials)
            task = TaskSpec(
                task_id=task_id, description=spec.description, prompt=spec.prompt, repo=mirror,
                base_branch=spec.repository.branch, result_branch=spec.result_branch or f"reactor/{ref.name}",
                test_command=spec.test.command, test_timeout=parse_duration(spec.test.timeout),
                model=spec.agent.model, opencode_config=spec.agent.config, timeout=parse_duration(spec.timeout),
                env=env,
            )
        except ReactorError as exc:
            reason = Reason.INVALID_INPUT if isinstance(exc, ConfigurationError) else Reason.BOOT_FAILED
            return TaskResult(task_id=task_id, outcome=Outcome.FAILED, reason=reason, message=str(exc)), False

        async def report(event: PhaseEvent) -> None:
            if event.phase.terminal:
                return  # the final status is written once, after the push
            await self.status.phase(ref, event.phase, event.message, generation,
                                    cell=cell_status(event.cell, ref.cell_id))
            await self.status.event(ref, event.phase.value, event.message or event.phase.value)

        result = await run_task(task, self.engine, report, cell_id=ref.cell_id, take_capacity=False)
        pushed = False
        if result.succeeded and spec.repository.push:
            await self._before_push(ref)
            try:
                await asyncio.to_thread(self.mirrors.push, mirror, task.branch, spec.repository.url, credentials)
                pushed = True
                # The repository has it now; a later task with this branch name must not collide here.
                await asyncio.to_thread(self.mirrors.delete_branch, mirror, task.branch)
            except ReactorError as exc:
                result.outcome, result.reason = Outcome.FAILED, Reason.PUSH_FAILED
                result.message = f"committed {result.commit} but the push failed: {exc}"
        return result, pushed

    async def _before_push(self, ref: TaskRef) -> None:
        """Last check before the irreversible step (a fleet: the task is still ours)."""

    async def _finish(self, ref: TaskRef, result: TaskResult, pushed: bool, generation: int | None) -> None:
        phase = Phase.SUCCEEDED if result.succeeded else Phase.FAILED
        await self.status.phase(
            ref, phase, result.message, generation, reason=result.reason.value, cell=None, completionTime=now(),
            result=result_status(result, pushed), usage=usage_status(result), phaseDurations=result.phase_durations,
        )
        await self.status.event(ref, phase.value, f"{result.reason.value}: {result.message}", warning=not result.succeeded)

    # -- secrets: read at run time, handed to the server's environment or to git, never stored --

    async def _read_secret(self, ref: TaskRef, name: str, field: str) -> dict[str, str]:
        try:
            secret = await asyncio.to_thread(self.core.read_namespaced_secret, name, ref.namespace)
        except ApiException as exc:
            if exc.status == 404:
                raise ConfigurationError(f"{field}: secret {name!r} not found in namespace {ref.namespace}") from None
            if exc.status == 403:
                raise ConfigurationError(f"{field}: the operator may not read secret {name!r} "
                                         f"in namespace {ref.namespace} (RBAC: secrets get)") from None
            raise
        return {key: base64.b64decode(value).decode() for key, value in (secret.data or {}).items()}

    async def _secret_env(self, ref: TaskRef, spec: AgentTaskSpec) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in spec.agent.env_from:
            data = await self._read_secret(ref, source.secret_ref.name, "spec.agent.envFrom")
            env.update({source.prefix + key: value for key, value in data.items()})
        return env

    async def _credentials(self, ref: TaskRef, spec: AgentTaskSpec) -> GitCredentials | None:
        secret_ref = spec.repository.credentials_secret_ref
        if secret_ref is None:
            return None
        data = await self._read_secret(ref, secret_ref.name, "spec.repository.credentialsSecretRef")
        return GitCredentials(username=data.get("username"), password=data.get("password"),
                              ssh_private_key=data.get("ssh-privatekey"))

    # -- orphans --

    async def reap(self, ref: TaskRef, status: dict) -> None:
        """Kill a cell's server recorded in status (only if it still carries this cell's
        marker: the PID may have been reused) and remove its worktree."""
        cell = status.get("cell") or {}
        cell_id = cell.get("cellId") or ref.cell_id
        pid = cell.get("serverPid")
        if pid and is_marked_for(int(pid), cell_id):
            log.warning("%s: killing orphaned server pid %s", ref, pid)
            await asyncio.to_thread(kill_process_group, int(pid))
        await asyncio.to_thread(self.engine.worktrees.remove_slot, cell_id)
