"""MergeQueue resources: thin glue from the API server to ``reactor.mergequeue``.

- **One driver per queue**, across replicas: the replica holding the queue's
  ``coordination.k8s.io/v1`` Lease (``reactor-mergequeue-<name>``, in the queue's namespace),
  taken over only after it was seen unrenewed for its whole duration (this replica's
  monotonic clock, as in client-go and ``fleet.py``). A driver that has not renewed for two
  thirds of the duration stops driving (its test runs are killed) before anyone may take
  over; its status writes are JSON patches led by a ``test`` of ``/status/holder``, so the API
  server refuses them once another replica holds the queue. Its base advance, if one was in
  flight, is a compare-and-swap on the branch, and the record says it was about to happen:
  the next driver finishes or forgets it (``MergeQueue.recover``).
- **The record** (entries, the advance in flight, the locked configuration) lives in the
  MergeQueue's ``status.record``; the columns of ``kubectl get mergequeues`` beside it.
- **The inbox** is the AgentTasks themselves: a task with ``spec.integrate: queue`` whose
  result was pushed says ``status.integration.state: Queued`` (``submit``, from the
  supervisor's post-push point); the driver takes every such task of its namespace with the
  same repository URL and branch, in the order they finished, and from then on writes their
  ``status.integration`` (``IntegrationStatus``): Queued (position), Integrating, Integrated
  (base commit), Ejected (reason, the conflicting paths or the failing tests' tail).
- Candidates are built in the operator's mirror of the repository (results reach it by the
  mirror's fetch: each task pushed its branch), tested confined (``ConfinedTests`` with the
  engine's confinement), and the base is advanced by a push whose lease is the old tip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets as token
import time
from collections.abc import Awaitable, Callable
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from reactor.durations import parse_duration
from reactor.infra.mirrors import GitCredentials, RepositoryMirrors
from reactor.kube.fleet import micro_time
from reactor.kube.status import JSON_PATCH, json_patch_operations
from reactor.kube.resource import (GROUP, MERGEQUEUES, PLURAL, VERSION, AgentTaskSpec, AgentTaskStatus, MergeQueueSpec,
                                   TaskRef, format_time, parse_time)
from reactor.kube.secrets import SecretReader
from reactor.kube.status import IntegrationStatus
from reactor.forge import Forge
from reactor.mergequeue import (ConfinedTests, EntryState, ForgeMerge, MergeQueue, PushedBranch, QueueConfig, QueueEvent,
                                QueueState)
from reactor.observe.fleet import QUEUE_FINISHED_SHOWN, QueueView, QueueViews
from reactor.observe.metrics import Metrics
from reactor.workflow.types import Phase

log = logging.getLogger(__name__)
LEASE_PREFIX = "reactor-mergequeue-"
TAIL_CHARS = 2000  # of a failing test output, in a task's status
# A result whose pull request is not recorded this long after its verdict (the forge is down;
# a fleet, whose PR status write is refused: docs/forge.md) is pushed like one without.
PULL_REQUEST_WAIT = 120.0


class HolderLost(Exception):
    """The API server no longer records this driver as the queue's holder."""


class QueueLease:
    """The Lease that makes one replica the driver of one queue."""

    def __init__(self, api_client: k8s.ApiClient, namespace: str, queue: str, identity: str, duration: float):
        self.coordination = k8s.CoordinationV1Api(api_client)
        self.namespace, self.name, self.identity, self.duration = namespace, LEASE_PREFIX + queue, identity, duration
        self._valid_until = 0.0
        self._seen: tuple[Any, Any] | None = None  # (holder, renewTime) of another holder
        self._seen_at = 0.0

    @property
    def renew_interval(self) -> float:
        return self.duration / 5

    def holds(self, margin: float = 0.0) -> bool:
        return time.monotonic() + margin < self._valid_until

    def try_hold(self) -> bool:
        """Acquire, renew or take over the Lease once. Blocking."""
        sent = time.monotonic()
        try:
            held = self._try_hold()
        except ApiException as exc:
            if exc.status != 409:  # 409: someone else wrote first
                log.warning("merge queue lease %s/%s: %s %s", self.namespace, self.name, exc.status, exc.reason)
            held = False
        if held:
            self._valid_until = sent + self.duration * 2 / 3  # stop driving before anyone may take over
        return held

    def _try_hold(self) -> bool:
        try:
            lease = self.coordination.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.coordination.create_namespaced_lease(self.namespace, self._body(None, transitions=0))
            return True
        holder = lease.spec.holder_identity
        if holder and holder != self.identity:
            seen = (holder, lease.spec.renew_time)
            if seen != self._seen:
                self._seen, self._seen_at = seen, time.monotonic()
            if time.monotonic() - self._seen_at < float(lease.spec.lease_duration_seconds or self.duration):
                return False
            log.info("merge queue lease %s/%s: taken over from %s", self.namespace, self.name, holder)
        renewing = holder == self.identity
        transitions = (lease.spec.lease_transitions or 0) + (0 if renewing else 1)
        self.coordination.replace_namespaced_lease(self.name, self.namespace, self._body(
            lease.metadata.resource_version, transitions, lease.spec.acquire_time if renewing else None))
        return True

    def _body(self, resource_version: str | None, transitions: int, acquired: Any = None) -> dict[str, Any]:
        now = micro_time()
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if resource_version:
            metadata["resourceVersion"] = resource_version
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
                "spec": {"holderIdentity": self.identity, "renewTime": now,
                         "acquireTime": micro_time(acquired) if acquired else now,
                         "leaseDurationSeconds": int(round(self.duration)), "leaseTransitions": transitions}}

    def release(self) -> None:
        """Give the Lease up (only if still ours), so another replica need not wait it out."""
        self._valid_until = 0.0
        with contextlib.suppress(ApiException):
            lease = self.coordination.read_namespaced_lease(self.name, self.namespace)
            if lease.spec.holder_identity == self.identity:
                options = k8s.V1DeleteOptions(preconditions=k8s.V1Preconditions(
                    resource_version=lease.metadata.resource_version))
                self.coordination.delete_namespaced_lease(self.name, self.namespace, body=options)


class StatusStore:
    """A queue's record in its MergeQueue's status, and its tasks' ``status.integration``."""

    def __init__(self, api_client: k8s.ApiClient, namespace: str, name: str, holder: str,
                 views: QueueViews | None = None):
        self.custom = k8s.CustomObjectsApi(api_client)
        self.views = views  # the fleet page's, updated with every record saved
        self.integration = IntegrationStatus(api_client)
        self.namespace, self.name, self.holder = namespace, name, holder
        self._written: dict[str, dict[str, Any]] = {}  # entry id -> integration last written

    def take(self) -> None:
        """Record this driver as the queue's holder (after taking its Lease)."""
        self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, self.namespace, MERGEQUEUES, self.name,
                                                          {"status": {"holder": self.holder}})

    def load(self) -> QueueState | None:
        body = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, MERGEQUEUES, self.name)
        record = (body.get("status") or {}).get("record")
        return QueueState.from_dict(record) if record else None

    def save(self, state: QueueState) -> None:
        operations = [{"op": "test", "path": "/status/holder", "value": self.holder}]
        operations += json_patch_operations({**summary(state), "record": state.to_dict()})
        try:
            self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, self.namespace, MERGEQUEUES, self.name,
                                                              operations, _content_type=JSON_PATCH)
        except ApiException as exc:
            if exc.status == 422:  # the test failed: another replica holds the queue now
                raise HolderLost(f"merge queue {self.namespace}/{self.name} is held by another replica") from None
            raise
        if self.views is not None:
            self.views.update(queue_view(self.namespace, self.name, state))
        for entry in state.entries:
            integration = task_integration(state, entry.id, self.name)
            if self._written.get(entry.id) != integration:
                # Only onto the result it is about (False: gone, or the task has moved on: a
                # rebase round started, or a newer result is in).
                self.integration.write(self.namespace, *task_of(entry.id), integration, about=entry.commit)
                self._written[entry.id] = integration


def entry_id(body: dict) -> str:
    """A task's entry in its queue: its name and uid (a task made again under the same name is
    another entry)."""
    return f"{body['metadata']['name']}.{body['metadata']['uid']}"


def task_of(entry: str) -> tuple[str, str]:
    """(name, uid) of an entry id (a uid has no dot; a name may)."""
    name, _, uid = entry.rpartition(".")
    return name, uid


def summary(state: QueueState) -> dict[str, Any]:
    """The MergeQueue's columns and counters."""
    queued, stats = state.queued(), state.stats
    return {
        "depth": len(queued), "head": task_of(queued[0].id)[0] if queued else "",
        "lastIntegration": stats.last_integration, "shortLastIntegration": stats.last_integration[:7],
        "lastIntegrationTime": format_time(stats.last_integration_at) if stats.last_integration_at else None,
        "baseGreen": stats.base_green, "testRuns": stats.test_runs, "integrated": stats.integrated,
        "ejected": stats.ejected,
        "message": f"{len(queued)} waiting" + (f", integrating {len(state.pending.carried)}" if state.pending else ""),
    }


def queue_view(namespace: str, name: str, state: QueueState) -> QueueView:
    """The queue as the fleet page draws it: waiting and integrating items in queue order,
    then the latest finished ones."""
    def item(entry) -> dict[str, Any]:
        return {"task": task_of(entry.id)[0], "state": entry.state.value, "position": state.position(entry.id),
                "reason": entry.reason, "commit": entry.integrated_as or entry.commit}
    active = [e for e in state.entries if e.state in (EntryState.QUEUED, EntryState.INTEGRATING)]
    active.sort(key=lambda e: (e.state is EntryState.QUEUED, state.position(e.id) or 0))
    finished = sorted((e for e in state.entries if e.state in (EntryState.INTEGRATED, EntryState.EJECTED)),
                      key=lambda e: e.finished_at, reverse=True)[:QUEUE_FINISHED_SHOWN]
    stats = state.stats
    return QueueView(namespace, name, branch=state.config.base_branch, depth=state.depth, base_green=stats.base_green,
                     last_integration=stats.last_integration,
                     last_integration_at=format_time(stats.last_integration_at) if stats.last_integration_at else None,
                     test_runs=stats.test_runs, integrated=stats.integrated, ejected=stats.ejected,
                     items=[item(e) for e in active + finished])


def task_integration(state: QueueState, entry_id: str, queue: str) -> dict[str, Any]:
    entry = state.get(entry_id)
    assert entry is not None
    integration: dict[str, Any] = {"state": entry.state.value, "queue": queue, "commit": entry.commit,
                                   "position": None, "baseCommit": None, "reason": None, "message": None}
    if entry.state is EntryState.QUEUED:
        integration["position"] = state.position(entry_id)
        integration["message"] = f"position {integration['position']} in merge queue {queue}"
    elif entry.state is EntryState.INTEGRATING:
        integration["message"] = "tested on the base tip; the base branch is being advanced"
    elif entry.state is EntryState.INTEGRATED:
        integration["baseCommit"] = entry.integrated_as
        integration["message"] = f"integrated into {state.config.base_branch} as {entry.integrated_as[:12]}"
    else:
        integration["reason"], integration["message"] = entry.reason, entry.detail[-TAIL_CHARS:]
        if entry.conflict_commit:  # where the task's rebase round starts from (kube/rebase.py)
            integration.update(conflictCommit=entry.conflict_commit, onto=entry.conflict_onto,
                               conflictPaths=entry.conflict_paths)
    return integration


class _Driver:
    """Drives one MergeQueue while this replica holds its Lease."""

    def __init__(self, queues: MergeQueues, namespace: str, name: str):
        self.queues, self.namespace, self.name = queues, namespace, name
        self.lease = QueueLease(queues.api_client, namespace, name, queues.identity, queues.lease_duration)
        self.wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._driving: asyncio.Task | None = None
        self._specs: dict[str, AgentTaskSpec] = {}  # entry id -> its task's spec (its forge and token)

    def start(self) -> None:
        self._task = asyncio.create_task(self._heartbeat(), name=f"merge queue {self.namespace}/{self.name}")

    async def stop(self, release: bool = True) -> None:
        for task in (self._driving, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if release:
            await asyncio.to_thread(self.lease.release)

    async def _heartbeat(self) -> None:
        while True:
            held = await asyncio.to_thread(self.lease.try_hold)
            if held and (self._driving is None or self._driving.done()):
                self._driving = asyncio.create_task(self._drive())
            elif not self.lease.holds() and self._driving is not None and not self._driving.done():
                log.error("merge queue %s/%s: Lease not renewed in time: driving stops", self.namespace, self.name)
                self._driving.cancel()
            await asyncio.sleep(self.lease.renew_interval)

    async def _drive(self) -> None:
        store = StatusStore(self.queues.api_client, self.namespace, self.name, self.lease.identity, self.queues.views)
        await asyncio.to_thread(store.take)
        while self.lease.holds():
            try:
                await self._drive_once(store)
            except HolderLost as exc:
                log.warning("%s", exc)
                return
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - logged; the next poll tries again
                log.exception("merge queue %s/%s", self.namespace, self.name)
            self.wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.queues.poll_interval)

    async def _drive_once(self, store: StatusStore) -> None:
        queues = self.queues
        custom = k8s.CustomObjectsApi(queues.api_client)
        try:
            body = await asyncio.to_thread(custom.get_namespaced_custom_object, GROUP, VERSION, self.namespace,
                                           MERGEQUEUES, self.name)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        spec = MergeQueueSpec.model_validate(body.get("spec") or {})
        state = await asyncio.to_thread(store.load)
        waiting, present = await self._inbox(custom, spec)
        inbox = [(entry, task, commit, pr) for entry, task, commit, pr in waiting
                 if state is None or state.get(entry) is None or state.get(entry).commit != commit]
        gone = [e.id for e in state.queued() if e.id not in present] if state is not None else []
        if not inbox and not gone and (state is None or not (state.queued() or state.pending)):
            return  # nothing to do: no fetch
        credentials = await self._credentials(spec)
        mirror = await asyncio.to_thread(queues.mirrors.sync, self.namespace, spec.repository.url, credentials)
        config = None
        if state is None:
            command = spec.test.command or inbox[0][1].test.command
            config = QueueConfig(repo=str(mirror), base_branch=spec.repository.branch, test_command=command,
                                 max_batch=spec.max_batch, max_parallel=spec.max_parallel,
                                 test_timeout=parse_duration(spec.test.timeout))
        base = PushedBranch(mirror, "origin", spec.repository.branch, credentials)
        merge = ForgeMerge(base, self._forge_for) if queues.forge_for is not None else None
        queue = MergeQueue(store, base, queues.tests, config, repo=mirror, pull_requests=merge,
                           on_event=lambda event: self._count(queue, event))
        queue.config.max_batch, queue.config.max_parallel = spec.max_batch, spec.max_parallel
        for entry in gone:  # its task was deleted while it waited
            await asyncio.to_thread(queue.withdraw, entry)
        for entry, _, commit, pr in inbox:
            try:
                await asyncio.to_thread(queue.enqueue_result, entry, commit, pr)
            except Exception as exc:  # noqa: BLE001 - a result that does not hold up is ejected, not retried
                await asyncio.to_thread(store.integration.write, self.namespace, *task_of(entry), {
                    "state": "Ejected", "queue": self.name, "reason": "InvalidResult", "message": str(exc)[:1024]})
        while self.lease.holds(margin=self.lease.renew_interval) and await queue.run_round():
            self.queues.depths[(self.namespace, self.name)] = queue.state.depth
        self.queues.depths[(self.namespace, self.name)] = queue.state.depth

    async def _forge_for(self, entry: str) -> Forge:
        """The forge of an entry's pull request, with its task's token (as its PR was opened)."""
        spec = self._specs.get(entry)
        if spec is None or self.queues.forge_for is None:
            raise LookupError(f"merge queue {self.namespace}/{self.name}: no task for {entry}")
        name, uid = task_of(entry)
        return await self.queues.forge_for(TaskRef(self.namespace, name, uid, ""), spec)

    def _count(self, queue: MergeQueue, event: QueueEvent) -> None:
        metrics, labels = self.queues.metrics, (self.namespace, self.name)
        if metrics is None:
            return
        if event.kind == "testing":
            metrics.queue_test_runs.labels(*labels).inc()
        elif event.kind == "integrated":
            metrics.queue_results.labels(*labels, "integrated", "").inc()
            entry = queue.state.get(event.entry_id)
            if entry is not None and entry.integrated_at:
                metrics.queue_integration.labels(*labels).observe(entry.integrated_at - entry.enqueued_at)
        elif event.kind == "ejected":
            metrics.queue_results.labels(*labels, "ejected", event.detail).inc()

    async def _inbox(self, custom: k8s.CustomObjectsApi, spec: MergeQueueSpec
                     ) -> tuple[list[tuple[str, AgentTaskSpec, str, int]], set[str]]:
        """Tasks of the namespace waiting for this queue, (entry id, spec, result commit, its
        open pull request's number or 0) in the order they finished; and the entry ids of every
        task that exists."""
        listed = await asyncio.to_thread(custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL)
        waiting, present = [], set()
        for body in listed.get("items", []):
            present.add(entry_id(body))
            status = AgentTaskStatus.of(body)
            result, integration = status.result, status.integration
            if (status.phase is not Phase.SUCCEEDED or result is None or not result.pushed or not result.commit
                    or integration is None or integration.state != "Queued"
                    or body["metadata"].get("deletionTimestamp")):
                continue
            try:
                task = AgentTaskSpec.model_validate(body.get("spec") or {})
            except ValueError:
                continue
            if spec.takes(task):
                self._specs[entry_id(body)] = task
                number = 0
                if task.result.pull_request:
                    pull = status.pull_request
                    if pull is not None and pull.head_commit == result.commit and pull.state == "open":
                        number = pull.number or 0  # lands through the forge's merge
                    elif not _pull_request_refused(status) and time.time() - (parse_time(
                            status.completion_time) or 0) < PULL_REQUEST_WAIT:
                        continue  # its pull request is being opened (after the verdict): wait for it
                waiting.append((status.completion_time or "", entry_id(body), task, result.commit, number))
        waiting.sort(key=lambda w: (w[0], w[1]))
        return [(entry, task, commit, number) for _, entry, task, commit, number in waiting], present

    async def _credentials(self, spec: MergeQueueSpec) -> GitCredentials | None:
        ref = spec.repository.credentials_secret_ref
        if ref is None:
            return None
        # The queue's author names the host its git talks to (spec.repository.url): the
        # operator's own forge token must not be handed to it (fourth review).
        self.queues.secrets.refuse_operator_secret(ref.name, "spec.repository.credentialsSecretRef")
        data = await self.queues.secrets.read(self.namespace, ref.name, "spec.repository.credentialsSecretRef")
        return GitCredentials(username=data.get("username"), password=data.get("password"),
                              ssh_private_key=data.get("ssh-privatekey"))


def _pull_request_refused(status: AgentTaskStatus) -> bool:
    """The forge refused the task's pull request (kube/pullrequests.py gave up): its result
    is pushed like one without."""
    return any(c.type == "PullRequestOpened" and c.status == "False" and c.reason == "ForgeRefused"
               for c in status.conditions)


class _DepthCollector(Collector):
    """``reactor_mergequeue_depth``, read at scrape time from the queues this replica drives."""

    def __init__(self, queues: MergeQueues) -> None:
        self.queues = queues

    def collect(self):
        depth = GaugeMetricFamily("reactor_mergequeue_depth", "Results waiting in merge queues this replica drives",
                                  labels=["namespace", "queue"])
        for (namespace, name), value in sorted(self.queues.depths.items()):
            depth.add_metric([namespace, name], value)
        yield depth


class MergeQueues:
    """Every MergeQueue this operator watches, each with a driver that drives it while this
    replica holds its Lease."""

    def __init__(self, api_client: k8s.ApiClient, tests: ConfinedTests, mirrors: RepositoryMirrors,
                 identity: str | None = None, lease_duration: float = 15.0, poll_interval: float = 2.0,
                 metrics: Metrics | None = None,
                 forge_for: Callable[[TaskRef, AgentTaskSpec], Awaitable[Forge]] | None = None,
                 views: QueueViews | None = None, operator_secrets: tuple[str, ...] = ()):
        """``forge_for``: a task's forge with its token (kube/pullrequests.py): a result with an
        open pull request then lands through the forge's merge (the PR reads as merged).
        ``operator_secrets``: the operator's own Secrets (--forge-token-secret), never a queue's
        git credentials."""
        self.api_client, self.tests, self.mirrors, self.metrics = api_client, tests, mirrors, metrics
        self.forge_for, self.views = forge_for, views
        self.depths: dict[tuple[str, str], int] = {}  # of the queues driven here
        if metrics is not None:
            metrics.registry.register(_DepthCollector(self))
        self.secrets = SecretReader(api_client, operator_secrets)
        self.identity = identity or f"reactor.{token.token_hex(4)}"
        self.lease_duration, self.poll_interval = lease_duration, poll_interval
        self.integration = IntegrationStatus(api_client)
        self._drivers: dict[tuple[str, str], _Driver] = {}

    def upsert(self, body: Any) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        driver = self._drivers.get(key)
        if driver is None:
            driver = self._drivers[key] = _Driver(self, *key)
            driver.start()
        driver.wake.set()

    async def remove(self, namespace: str, name: str) -> None:
        driver = self._drivers.pop((namespace, name), None)
        if driver is not None:
            await driver.stop()
        if self.views is not None:
            self.views.remove(namespace, name)

    async def submit(self, ref: TaskRef, spec: AgentTaskSpec) -> None:
        """The supervisor's post-push point: a task whose result is pushed asks to be
        integrated (``spec.integrate: queue``). Its driver, here or on another replica, takes it."""
        if spec.integrate != "queue":
            return
        await asyncio.to_thread(self.integration.write, ref.namespace, ref.name, ref.uid, {
            "state": "Queued", "message": f"waiting for the merge queue of {spec.repository.url} "
                                          f"{spec.repository.branch}"})
        for (namespace, _), driver in self._drivers.items():
            if namespace == ref.namespace:
                driver.wake.set()

    async def stop(self, release: bool = True) -> None:
        """Stop every driver and give their Leases up (``release=False`` leaves them to expire,
        as a replica that dies does)."""
        drivers, self._drivers = list(self._drivers.values()), {}
        await asyncio.gather(*(d.stop(release) for d in drivers))

    def holding(self) -> list[tuple[str, str]]:
        """Queues this replica drives now (tests, observability)."""
        return [key for key, driver in self._drivers.items() if driver.lease.holds()]
