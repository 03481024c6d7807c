"""Kopf handlers for AgentTask: thin translations from resource events to the supervisor.

- create  -> admit (Pending, then run when capacity allows)
- resume  -> after an operator (re)start: reap orphans of interrupted runs, retry or fail
- delete  -> stop the run at once, kill the server group, remove the worktree; only then
             does kopf remove the finalizer
- startup -> kill servers and remove worktrees that a previous operator process left
- cleanup -> operator shutdown: stop every cell
- event   -> every change of every task: wakes the tasks that depend on it (spec.dependsOn);
             in a fleet also the replicas' shared scheduling

SpendLimit (create/update/resume/delete) -> the supervisor's spend limits.
MergeQueue (create/update/resume/delete; a fleet: every event) -> the queues' drivers
(``kube/mergequeues.py``), each driving while this replica holds the queue's Lease.
On startup the web page / metrics server starts (``--web``), and the SpendLimits of the
watched namespaces are read before any task resumes (so none starts past a limit).
"""

from __future__ import annotations

import asyncio
import copy
import logging
from typing import Any

import kopf

from reactor.infra.cleanup import cleanup_leftovers
from reactor.kube.resource import FINALIZER, GROUP, MERGEQUEUES, PLURAL, SPENDLIMITS, VERSION

registry = kopf.OperatorRegistry()
RESOURCE = (GROUP, VERSION, PLURAL)
SPENDLIMIT = (GROUP, VERSION, SPENDLIMITS)
MERGEQUEUE = (GROUP, VERSION, MERGEQUEUES)


@kopf.on.login(registry=registry)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # A plain OperatorRegistry has no login handler: use the kubernetes client's
    # configuration (in-cluster service account, else the kubeconfig).
    return kopf.login_via_client(**kwargs)


@kopf.on.startup(registry=registry)
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    # Kopf's own bookkeeping under our prefix; see docs/architecture.md for what GitOps sees.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="reactor.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="reactor.dev", key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # our own Events tell the story of each task
    settings.watching.server_timeout = 300
    # The resource is known; without this kopf lists CRDs and namespaces cluster-wide,
    # which least-privilege RBAC refuses (and kopf retries for ~1 minute).
    settings.scanning.disabled = True
    confinement = memo.supervisor.engine.confinement.status
    (logger.info if confinement.confined else logger.warning)("%s", confinement.message)
    # Cells of tasks that will be reopened in their sessions keep their checkout and state dir.
    keep = await memo.supervisor.cells_to_keep()
    # Cells proven to be those an earlier operator recorded (--cells-outlive-operator) keep running.
    running = memo.supervisor.running_cells()
    for line in await asyncio.to_thread(cleanup_leftovers, memo.supervisor.engine.work_dir, None, keep, running):
        logger.warning("startup cleanup: %s", line)
    await memo.supervisor.start()  # reads the SpendLimits first: no task starts past one
    if memo.get("web") is not None:
        await memo.web.start()


@kopf.on.create(*RESOURCE, registry=registry)
async def created(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await memo.supervisor.admit(body)


@kopf.on.resume(*RESOURCE, registry=registry)
async def resumed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await memo.supervisor.resume(body)


@kopf.on.delete(*RESOURCE, registry=registry)
async def deleted(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    waiting = await memo.supervisor.stop(body)
    if waiting:
        raise kopf.TemporaryError(waiting, delay=1)


@kopf.on.event(*RESOURCE, registry=registry)
async def task_seen(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:  # noqa: A002 - kopf's name
    """Any change of any task (stateless): wakes the tasks that depend on it."""
    memo.supervisor.task_changed(type, copy.deepcopy(dict(body)))


@kopf.on.cleanup(registry=registry)
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("merge_queues") is not None:
        await memo.merge_queues.stop()  # gives the queues' Leases up: another replica goes on at once
    await memo.supervisor.shutdown()
    if memo.get("web") is not None:
        await memo.web.stop()


@kopf.on.resume(*SPENDLIMIT, registry=registry)
@kopf.on.create(*SPENDLIMIT, registry=registry)
@kopf.on.update(*SPENDLIMIT, field="spec", registry=registry)
async def spendlimit_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.supervisor.limits.upsert(body)


@kopf.on.delete(*SPENDLIMIT, registry=registry, optional=True)
async def spendlimit_deleted(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.supervisor.limits.remove(body["metadata"]["namespace"], body["metadata"]["name"])


@kopf.on.resume(*MERGEQUEUE, registry=registry)
@kopf.on.create(*MERGEQUEUE, registry=registry)
@kopf.on.update(*MERGEQUEUE, field="spec", registry=registry)
async def mergequeue_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    if memo.get("merge_queues") is not None:
        memo.merge_queues.upsert(body)


@kopf.on.delete(*MERGEQUEUE, registry=registry, optional=True)
async def mergequeue_deleted(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    if memo.get("merge_queues") is not None:
        await memo.merge_queues.remove(body["metadata"]["namespace"], body["metadata"]["name"])


async def mergequeue_seen(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:  # noqa: A002
    """A fleet's view of MergeQueues: every replica runs a driver, the Lease picks the one that drives."""
    if memo.get("merge_queues") is None:
        return
    if type == "DELETED":
        await memo.merge_queues.remove(body["metadata"]["namespace"], body["metadata"]["name"])
    else:
        memo.merge_queues.upsert(body)


async def spendlimit_seen(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:  # noqa: A002
    """A fleet's view of SpendLimits: stateless (no kopf bookkeeping written by N replicas)."""
    if type == "DELETED":
        memo.supervisor.limits.remove(body["metadata"]["namespace"], body["metadata"]["name"])
    else:
        memo.supervisor.limits.upsert(body)


async def observed(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:  # noqa: A002 - kopf's name
    memo.supervisor.observe(type, copy.deepcopy(dict(body)))


# Many replicas (`reactor operator --fleet`): every replica sees every event of every task
# (on.event keeps no state on the object), and a task runs where a replica claims it. Kopf's
# create/resume bookkeeping would be written by whichever replica saw the object first, so it
# is not used; the finalizer (on.delete) is, so a deleted task's cell is gone before it is.
fleet_registry = kopf.OperatorRegistry()
kopf.on.login(registry=fleet_registry)(login)
kopf.on.startup(registry=fleet_registry)(configure)
kopf.on.event(*RESOURCE, registry=fleet_registry)(observed)
kopf.on.delete(*RESOURCE, registry=fleet_registry)(deleted)
kopf.on.cleanup(registry=fleet_registry)(shutdown)
kopf.on.event(*SPENDLIMIT, registry=fleet_registry)(spendlimit_seen)
kopf.on.event(*MERGEQUEUE, registry=fleet_registry)(mergequeue_seen)
