"""Kopf handlers for AgentTask: thin translations from resource events to the supervisor.

- create  -> admit (Pending, then run when capacity allows)
- resume  -> after an operator (re)start: reap orphans of interrupted runs, retry or fail
- delete  -> stop the run at once, kill the server group, remove the worktree; only then
             does kopf remove the finalizer
- startup -> kill servers and remove worktrees that a previous operator process left
- cleanup -> operator shutdown: stop every cell
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from reactor.infra.cleanup import cleanup_leftovers
from reactor.kube.resource import FINALIZER, GROUP, PLURAL, VERSION

registry = kopf.OperatorRegistry()
RESOURCE = (GROUP, VERSION, PLURAL)


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
    for line in await asyncio.to_thread(cleanup_leftovers, memo.supervisor.engine.work_dir):
        logger.warning("startup cleanup: %s", line)


@kopf.on.create(*RESOURCE, registry=registry)
async def created(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await memo.supervisor.admit(body)


@kopf.on.resume(*RESOURCE, registry=registry)
async def resumed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await memo.supervisor.resume(body)


@kopf.on.delete(*RESOURCE, registry=registry)
async def deleted(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await memo.supervisor.stop(body)


@kopf.on.cleanup(registry=registry)
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    await memo.supervisor.shutdown()
