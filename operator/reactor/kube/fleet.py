"""Many operator replicas sharing AgentTasks, coordinated through the API server itself.

No queue or protocol of our own: Kubernetes' optimistic concurrency and Leases.

- **Membership.** Each replica heartbeats a ``coordination.k8s.io/v1`` Lease named
  ``reactor-replica-<replica>``. Its ``holderIdentity`` is the replica's *incarnation*
  (``<replica>.<random>``): a new one at every start and after every fence, so claims made
  by an earlier incarnation are dead the moment the new one takes the Lease over.
- **Claims.** A task is claimed with a merge patch of its status that carries
  ``metadata.resourceVersion``: the API server applies it only to the version the claimer
  read, so of two replicas racing for one task exactly one wins (the other gets 409).
  ``status.claim = {replica, holder, since}`` records who runs it (``kubectl get -o wide``).
- **Liveness** of a claim: its holder still holds its Lease, and the Lease was seen to be
  renewed within ``leaseDurationSeconds``. "Seen" is this replica's own monotonic clock,
  as in client-go's leader election: no comparison of clocks between machines.
- **Fencing.** A replica that has not renewed its Lease for ``fence_after`` (two thirds of
  the duration) stops its cells and takes a new incarnation, before any other replica can
  consider the Lease expired (the full duration, counted from a later instant: others see
  a renewal only after it was sent). Every status write of a holder is a JSON patch whose
  first operation tests ``/status/claim/holder``: the API server refuses the write once the
  task was adopted, even from a replica that slept through its own fence (SIGSTOP); that
  write is kube/status.py's (``StatusWriter`` with this object as its ``Fence``). Right
  before a push the holder re-reads the task (:meth:`ReplicaLeases.confirm`).

The engine knows nothing of this; the supervisor's fleet ownership policy
(kube/ownership.py) asks for a claim before it starts a cell, checks it before pushing, and
stops its cells when this replica is fenced. Time is read from ``clock`` (monotonic
seconds), so the rules can be checked with a clock a test moves.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from reactor.kube.resource import GROUP, PLURAL, VERSION, AgentTaskStatus, ClaimStatus, TaskRef
from reactor.kube.status import ClaimLost

__all__ = ["ClaimLost", "FleetSettings", "ReplicaLeases", "LEASE_PREFIX", "LEASE_LABEL"]

log = logging.getLogger(__name__)

LEASE_PREFIX = "reactor-replica-"
LEASE_LABEL = "reactor.dev/replica"
Clock = Callable[[], float]
ClaimWrite = Callable[[dict, dict[str, Any]], Awaitable[bool]]


def micro_time(moment: dt.datetime | None = None) -> str:
    """RFC 3339 with microseconds (the Lease's MicroTime; claim times sort within a second)."""
    return (moment or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class FleetSettings:
    replica: str  # stable name of this replica (a StatefulSet pod name: reactor-0)
    namespace: str  # where the Leases live (the operator's own namespace)
    lease_duration: float = 15.0

    def __post_init__(self) -> None:
        if self.lease_duration < 3:
            raise ValueError("lease duration must be at least 3 seconds")

    @property
    def renew_interval(self) -> float:
        return self.lease_duration / 5

    @property
    def fence_after(self) -> float:
        """Without a successful renewal for this long, stop every cell: a third of the
        duration is left to do so before any other replica may adopt the tasks."""
        return self.lease_duration * 2 / 3

    @property
    def lease_name(self) -> str:
        return LEASE_PREFIX + self.replica


@dataclass(frozen=True)
class LeaseView:
    """One replica's Lease as listed."""

    replica: str
    holder: str | None  # holderIdentity: the replica's incarnation
    renewed: str | None  # renewTime as its holder wrote it (compared for change only)
    duration: float


@dataclass
class _LeaseSeen:
    holder: str | None
    renewed: str | None  # renewTime as written by its holder (compared for change only)
    duration: float
    observed: float  # our monotonic clock when (holder, renewed) last changed


class ReplicaLeases:
    """This replica's membership (its Lease), its view of the others' Leases, and the claims
    it holds; whether any claim is live."""

    def __init__(self, api_client: k8s.ApiClient, settings: FleetSettings,
                 on_fenced: Callable[[], Awaitable[None]] | None = None,
                 on_view: Callable[[], Awaitable[None]] | None = None,
                 on_lost: Callable[[TaskRef], None] | None = None, clock: Clock = time.monotonic):
        self.settings = settings
        self.coordination = k8s.CoordinationV1Api(api_client)
        self.custom = k8s.CustomObjectsApi(api_client)
        self.on_fenced, self.on_view, self.on_lost = on_fenced, on_view, on_lost
        self.clock = clock
        self.holder = self._new_incarnation()
        self.fences = 0  # how often this replica fenced itself (observability, tests)
        self._acquired = False
        self._valid_until = 0.0  # monotonic; our own claims are live only before it
        self._lease_version: str | None = None
        self._seen: dict[str, _LeaseSeen] = {}
        self._held: dict[str, str] = {}  # task uid -> holder (incarnation) that claimed it
        self._tasks: list[asyncio.Task] = []
        self._fencing: asyncio.Task | None = None
        # The heartbeat's own threads: git fetches and status writes queued in the default
        # pool must not delay a renewal into a fence.
        self._heartbeat_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="fleet-heartbeat")

    @property
    def replica(self) -> str:
        return self.settings.replica

    async def _lease_call(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("_request_timeout", self.settings.renew_interval)
        return await asyncio.get_running_loop().run_in_executor(self._heartbeat_pool,
                                                                functools.partial(function, *args, **kwargs))

    def _new_incarnation(self) -> str:
        return f"{self.settings.replica}.{secrets.token_hex(4)}"

    # -- lifecycle --

    async def start(self) -> None:
        """Take this replica's Lease and read the others' before returning: no claim is
        judged dead on an empty view."""
        deadline = self.clock() + self.settings.lease_duration * 4
        while not await self._heartbeat_once():
            if self.clock() > deadline:
                raise RuntimeError(f"could not take Lease {self.settings.namespace}/{self.settings.lease_name}")
            await asyncio.sleep(self.settings.renew_interval)
        self._tasks = [asyncio.create_task(self._heartbeat(), name="fleet heartbeat"),
                       asyncio.create_task(self._watchdog(), name="fleet watchdog")]

    async def stop(self) -> None:
        """Stop heartbeating and give the Lease up (deleted, only if still ours), so the other
        replicas need not wait for it to expire."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._acquired and self._lease_version:
            options = k8s.V1DeleteOptions(preconditions=k8s.V1Preconditions(resource_version=self._lease_version))
            with contextlib.suppress(ApiException):
                await self._lease_call(self.coordination.delete_namespaced_lease, self.settings.lease_name,
                                       self.settings.namespace, body=options, _request_timeout=5)
        self._acquired, self._valid_until = False, 0.0
        self._heartbeat_pool.shutdown(wait=False)

    # -- membership --

    def holds_lease(self, margin: float = 0.0) -> bool:
        """Our Lease is ours for at least ``margin`` more seconds (a local, synchronous check:
        valid even in the first instant after a SIGCONT)."""
        return self._acquired and self.clock() + margin < self._valid_until

    async def _heartbeat(self) -> None:
        while True:
            began = self.clock()
            with contextlib.suppress(Exception):  # logged inside; the watchdog fences
                await self._heartbeat_once()
            await asyncio.sleep(max(0.0, self.settings.renew_interval - (self.clock() - began)))

    async def _watchdog(self) -> None:
        """Fence at ``_valid_until`` unless a renewal moved it: a renewal can hang (a
        partitioned network) while the deadline passes."""
        while True:
            await asyncio.sleep(await self.fence_if_due())

    async def fence_if_due(self) -> float:
        """Fence when our Lease's deadline has passed (two thirds of the duration after the
        last renewal was sent); returns how long until it is worth looking again."""
        remaining = self._valid_until - self.clock()
        if self._acquired and remaining <= 0:
            await self.fence("the Lease was not renewed in time")
            return 0.0
        return max(0.02, remaining) if self._acquired else self.settings.renew_interval

    async def _heartbeat_once(self) -> bool:
        if self._acquired and not self.holds_lease():
            await self.fence("woke past the Lease's deadline")  # e.g. after SIGSTOP/SIGCONT
        sent = self.clock()
        try:
            renewed = await self._renew() if self._acquired else await self._acquire()
        except (ApiException, OSError, Exception) as exc:  # noqa: BLE001 - any failure: not renewed
            log.warning("fleet: cannot renew Lease %s: %s", self.settings.lease_name, _short(exc))
            renewed = False
        if renewed and self._acquired:
            self.note_renewal(sent)
        try:
            await self.refresh()
        except Exception as exc:  # noqa: BLE001
            log.warning("fleet: cannot list Leases: %s", _short(exc))
            return False
        if self.on_view is not None:
            await self.on_view()
        return renewed

    def note_renewal(self, sent: float) -> None:
        """Our Lease was written (taken or renewed) by a request sent at ``sent``: our claims
        are live until ``fence_after`` later, when we fence ourselves unless renewed again.
        The others consider the Lease expired only a full duration after they *see* a
        renewal, which is later than we sent it: we always stop first."""
        self._acquired = True
        self._valid_until = sent + self.settings.fence_after

    def _lease_body(self, acquire: bool, transitions: int | None = None) -> dict[str, Any]:
        now = micro_time()
        spec: dict[str, Any] = {"holderIdentity": self.holder, "renewTime": now,
                                "leaseDurationSeconds": int(round(self.settings.lease_duration))}
        if acquire:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = transitions or 0
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.settings.lease_name, "namespace": self.settings.namespace,
                             "labels": {LEASE_LABEL: self.settings.replica}},
                "spec": spec}

    async def _acquire(self) -> bool:
        """Create our Lease, or take it over from an earlier incarnation of this replica."""
        name, namespace = self.settings.lease_name, self.settings.namespace
        try:
            current = await self._lease_call(self.coordination.read_namespaced_lease, name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            current = None
        if current is None:
            created = await self._lease_call(self.coordination.create_namespaced_lease, namespace,
                                             self._lease_body(acquire=True))
            self._lease_version = created.metadata.resource_version
        else:
            body = self._lease_body(acquire=True, transitions=(current.spec.lease_transitions or 0) + 1)
            body["metadata"]["resourceVersion"] = current.metadata.resource_version
            if current.spec.holder_identity and current.spec.holder_identity != self.holder:
                log.info("fleet: %s takes Lease %s over from %s", self.holder, name, current.spec.holder_identity)
            updated = await self._lease_call(self.coordination.replace_namespaced_lease, name, namespace, body)
            self._lease_version = updated.metadata.resource_version
        self._acquired = True
        log.info("fleet: replica %s joined as %s", self.replica, self.holder)
        return True

    async def _renew(self) -> bool:
        body = {"metadata": {"resourceVersion": self._lease_version},
                "spec": {"holderIdentity": self.holder, "renewTime": micro_time()}}
        try:
            updated = await self._lease_call(self.coordination.patch_namespaced_lease, self.settings.lease_name,
                                             self.settings.namespace, body)
        except ApiException as exc:
            if exc.status in (404, 409):  # deleted or changed by someone else: it is not ours any more
                await self.fence(f"the Lease was taken ({exc.status})")
                return False
            raise
        self._lease_version = updated.metadata.resource_version
        return True

    async def fence(self, why: str) -> None:
        """Stop claiming: forget every claim, take a new incarnation (the old one's claims are
        dead for everyone, ourselves included), stop every cell. Idempotent while it runs."""
        if self._fencing is not None and not self._fencing.done():
            await asyncio.shield(self._fencing)
            return
        if not self._acquired:
            return
        self._fencing = asyncio.ensure_future(self._fence(why))
        await asyncio.shield(self._fencing)

    async def _fence(self, why: str) -> None:
        log.error("fleet: replica %s fenced (%s): stopping its cells; its tasks go to other replicas", self.holder, why)
        self._acquired, self._valid_until = False, 0.0
        self._held.clear()
        self.holder = self._new_incarnation()
        self.fences += 1
        if self.on_fenced is not None:
            await self.on_fenced()

    async def refresh(self) -> None:
        """Read every replica's Lease; note when each was last seen to change."""
        leases = await self._lease_call(self.coordination.list_namespaced_lease, self.settings.namespace,
                                        label_selector=LEASE_LABEL)
        self.note_leases([
            LeaseView((lease.metadata.labels or {}).get(LEASE_LABEL) or "", lease.spec.holder_identity,
                      micro_time(lease.spec.renew_time) if lease.spec.renew_time else None,
                      float(lease.spec.lease_duration_seconds or 0))
            for lease in leases.items])

    def note_leases(self, leases: list[LeaseView]) -> None:
        """What a list of the Leases showed: a Lease is live for its duration after we *saw*
        it change (holder or renewTime), on our own clock: no clocks compared across machines."""
        now = self.clock()
        seen: dict[str, _LeaseSeen] = {}
        for lease in leases:
            if not lease.replica:
                continue
            before = self._seen.get(lease.replica)
            changed = before is None or (before.holder, before.renewed) != (lease.holder, lease.renewed)
            seen[lease.replica] = _LeaseSeen(lease.holder, lease.renewed, lease.duration,
                                             now if changed or before is None else before.observed)
        self._seen = seen

    def replicas(self) -> dict[str, bool]:
        """Every replica with a Lease, and whether it is live."""
        now = self.clock()
        return {name: seen.holder is not None and now - seen.observed < seen.duration for name, seen in self._seen.items()}

    # -- claims --

    def claim_alive(self, claim: ClaimStatus | None) -> bool:
        if claim is None or not claim.holder:
            return False
        if claim.replica == self.replica:
            # Ours: live only under our current incarnation and while our Lease holds.
            return claim.holder == self.holder and self.holds_lease()
        seen = self._seen.get(claim.replica or "")
        return seen is not None and seen.holder == claim.holder and self.clock() - seen.observed < seen.duration

    def claimable(self, body: dict) -> bool:
        """Not finished, not being deleted, and nobody live holds it."""
        status = AgentTaskStatus.of(body)
        if status.finished or body["metadata"].get("deletionTimestamp"):
            return False
        return not self.claim_alive(status.claim)

    async def _claimable_now(self, body: dict, claimable: Callable[[dict], bool] | None = None) -> bool:
        """claimable(), but a claim that looks dead is judged on a fresh list of Leases: our
        view may predate the claimer's Lease (a replica that just started or restarted)."""
        claimable = claimable or self.claimable
        if not claimable(body):
            return False
        claim = AgentTaskStatus.of(body).claim
        if claim is not None and claim.replica != self.replica:
            await self.refresh()
            return claimable(body)
        return True

    def holds(self, ref: TaskRef) -> bool:
        """We claimed this task under our current incarnation and our Lease holds (local check)."""
        return self.holder_of(ref) is not None

    def holder_of(self, ref: TaskRef) -> str | None:
        """The holder our claim of this task carries, while it is live (the status writer's
        fence: the API server must still record it for a write of ours to apply)."""
        holder = self._held.get(ref.uid)
        return holder if holder == self.holder and self.holds_lease() else None

    def lost(self, ref: TaskRef) -> None:
        """The API server refused our write: the task is someone else's now."""
        self._held.pop(ref.uid, None)
        if self.on_lost is not None:
            self.on_lost(ref)

    async def read(self, ref: TaskRef) -> dict | None:
        try:
            return await asyncio.to_thread(self.custom.get_namespaced_custom_object, GROUP, VERSION,
                                           ref.namespace, PLURAL, ref.name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def claim_status(self) -> dict[str, Any]:
        """``status.claim`` for a claim made now."""
        return {"replica": self.replica, "holder": self.holder, "since": micro_time()}

    async def claim(self, ref: TaskRef, first_status: Callable[[dict], dict[str, Any] | None],
                    write: ClaimWrite, attempts: int = 5,
                    claimable: Callable[[dict], bool] | None = None) -> tuple[dict, dict[str, Any]] | None:
        """Claim the task if it is claimable: ``first_status(fresh body)`` gives the status to
        write with the claim (or None: do not claim); ``write(body, status)`` writes it onto
        the version read (TaskStatus.claim: False when anything changed the task meanwhile;
        then read again and decide again). ``claimable``: instead of :meth:`claimable` (a
        finished task taken for its pull request). Returns (the body read, the status
        written), or None."""
        for _ in range(attempts):
            if not self.holds_lease(margin=self.settings.renew_interval):
                return None
            body = await self.read(ref)
            if (body is None or body["metadata"]["uid"] != ref.uid
                    or not await self._claimable_now(body, claimable)):
                return None
            status = first_status(body)
            if status is None:
                return None
            holder = self.holder
            status = {**status, "claim": self.claim_status()}
            if not await write(body, status):
                continue  # someone wrote first (another replica's claim, or any change): look again
            if holder != self.holder:  # fenced while the write was in flight: it claimed for a dead incarnation
                return None
            self._held[ref.uid] = holder
            return body, status
        return None

    def release(self, ref: TaskRef) -> None:
        self._held.pop(ref.uid, None)

    async def confirm(self, ref: TaskRef, margin: float) -> bool:
        """Right before an irreversible step (the push): we still hold the task on the API
        server, and our Lease holds for ``margin`` more seconds (waiting for the next renewal
        if it is due; False once we are fenced)."""
        while self.holds(ref) and not self.holds_lease(margin):
            await asyncio.sleep(0.05)
        if not self.holds(ref):
            return False
        claim = AgentTaskStatus.of(await self.read(ref) or {}).claim
        return claim is not None and claim.holder == self._held.get(ref.uid) and self.holds_lease(margin)


def _short(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"{exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"[:200]
