"""SpendLimit: a cap on what all AgentTasks of a namespace spend together.

Each SpendLimit counts its namespace's spend over its period (the UTC day, or since it was
created) from every model step of every task, as the steps end (the observatory's spend
ledger). Its count lives in its status, which is where it survives an operator restart:
written at most every ``flush_interval`` seconds and at once when the limit is crossed (a
crash loses at most the spend of that interval). When crossed, every running task of the
namespace is stopped (reason SpendLimitExceeded) and new ones wait in Pending until the
period ends or the limit is raised.

Many replicas (``--fleet``) share one SpendLimit without a lock: each counts the steps of
the tasks it runs and writes only its own entry of ``status.replicas`` (a merge patch of one
map key, so concurrent writers never overwrite each other); each learns the others' counts
from the SpendLimit's watch events, and the spend is the sum.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from reactor.errors import ConfigurationError
from reactor.kube.resource import GROUP, SPENDLIMITS, VERSION, SpendLimitSpec, SpendLimitStatus
from reactor.observe.fleet import SpendLedger, utc_day, utc_iso

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 2.0


@dataclass
class _Limit:
    namespace: str
    name: str
    spec: SpendLimitSpec
    generation: int | None
    created: str
    period: str = ""
    cost: float = 0.0  # this replica's own count
    tokens: int = 0
    dirty: bool = True
    others: dict[str, tuple[str, float, int]] = field(default_factory=dict)  # replica -> (period, cost, tokens)

    @property
    def total_cost(self) -> float:
        return self.cost + sum(c for period, c, _ in self.others.values() if period == self.period)

    @property
    def total_tokens(self) -> int:
        return self.tokens + sum(t for period, _, t in self.others.values() if period == self.period)

    def current_period(self) -> str:
        return utc_day() if self.spec.period == "Daily" else "Total"

    def roll(self) -> bool:
        """Start the new period if it began; True when it did."""
        period = self.current_period()
        if period != self.period:
            self.period, self.cost, self.tokens, self.dirty = period, 0.0, 0, True
            return True
        return False

    @property
    def max_cost(self) -> float | None:
        return float(self.spec.max_cost) if self.spec.max_cost is not None else None

    def exceeded(self) -> str | None:
        over = []
        cost, tokens = self.total_cost, self.total_tokens
        if self.max_cost is not None and cost > self.max_cost + 1e-12:
            over.append(f"${cost:.4f} spent of maxCost ${self.max_cost:g}")
        if self.spec.max_tokens is not None and tokens > self.spec.max_tokens:
            over.append(f"{tokens} tokens of maxTokens {self.spec.max_tokens}")
        if not over:
            return None
        when = "today (UTC)" if self.spec.period == "Daily" else "in total"
        return f"namespace spend limit {self.name} reached: {', '.join(over)} {when}"

    def status(self, replica: str) -> dict[str, Any]:
        reason = self.exceeded()
        period_start = (f"{self.period}T00:00:00Z" if self.spec.period == "Daily" else self.created)
        cost = self.total_cost
        return {"period": self.period, "periodStart": period_start, "spentCost": round(cost, 6),
                "spentDisplay": f"${cost:.4f}", "spentTokens": self.total_tokens, "exceeded": reason is not None,
                "message": reason or "within the limit", "observedGeneration": self.generation,
                "updateTime": utc_iso(),
                "replicas": {replica: {"period": self.period, "spentCost": round(self.cost, 6),
                                       "spentTokens": self.tokens}}}

    def learn(self, status: SpendLimitStatus, replica: str) -> bool:
        """Take the other replicas' counts from a status read back; True when they changed."""
        others = {name: (entry.period, entry.spent_cost, entry.spent_tokens)
                  for name, entry in status.replicas.items() if name != replica}
        changed, self.others = others != self.others, others
        return changed


StopNamespace = Callable[[str, str], None]  # (namespace, message): stop its running tasks


class SpendLimits:
    def __init__(self, api_client: k8s.ApiClient, ledger: SpendLedger, stop_namespace: StopNamespace,
                 flush_interval: float = FLUSH_INTERVAL, replica: str = "operator") -> None:
        self.custom = k8s.CustomObjectsApi(api_client)
        self.replica = replica  # this replica's entry in status.replicas
        self.ledger = ledger
        self.stop_namespace = stop_namespace
        self.flush_interval = flush_interval
        self._limits: dict[tuple[str, str], _Limit] = {}
        self._changed: dict[str, asyncio.Event] = {}  # per namespace: a limit was raised or removed
        self._flusher: asyncio.Task | None = None
        self._dirty = asyncio.Event()
        self._urgent = asyncio.Event()  # a limit was crossed: write now, not after the interval
        ledger.subscribe(self.on_spend)

    # -- the resource (kopf handlers) --

    def upsert(self, body: Any) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        spec = SpendLimitSpec.model_validate(body.get("spec") or {})
        limit = self._limits.get(key)
        if limit is None:
            limit = _Limit(key[0], key[1], spec, meta.get("generation"), meta.get("creationTimestamp") or utc_iso())
            status = SpendLimitStatus.of(body)
            limit.roll()
            own = status.replicas.get(self.replica)
            if own is not None and own.period == limit.period:  # the count kept across a restart
                limit.cost, limit.tokens = own.spent_cost, own.spent_tokens
            elif status.period == limit.period and not status.replicas:  # written before replicas
                limit.cost, limit.tokens = status.spent_cost, status.spent_tokens
            elif spec.period == "Daily":  # new: what the namespace already spent today counts
                today = self.ledger.today(key[0])
                limit.cost, limit.tokens = today.cost, today.tokens
            if spec.period == "Daily":
                self.ledger.seed(key[0], limit.period, limit.cost, limit.tokens)
            self._limits[key] = limit
            limit.learn(status, self.replica)
        elif limit.generation == meta.get("generation") and limit.spec == spec:
            # Only the status changed (a fleet's replicas see each other's counts this way).
            if limit.learn(SpendLimitStatus.of(body), self.replica):
                self._signal(key[0])
                self._enforce(limit)
            return
        else:
            limit.spec, limit.generation = spec, meta.get("generation")
            limit.learn(SpendLimitStatus.of(body), self.replica)
        limit.dirty = True
        self._mark_dirty()
        self._signal(key[0])  # maybe raised: held tasks look again
        self._enforce(limit)

    def remove(self, namespace: str, name: str) -> None:
        self._limits.pop((namespace, name), None)
        self._signal(namespace)

    # -- spend --

    def on_spend(self, namespace: str, cost: float, tokens: int) -> None:
        for limit in self._in(namespace):
            was_over = limit.exceeded() is not None
            if limit.roll():
                self._signal(namespace)
            limit.cost += cost
            limit.tokens += tokens
            limit.dirty = True
            if not was_over and limit.exceeded() is not None:
                log.warning("%s", limit.exceeded())
                self._urgent.set()
            self._enforce(limit)
        self._mark_dirty()

    def blocked(self, namespace: str) -> str | None:
        """Why new tasks of ``namespace`` must wait, or None."""
        for limit in self._in(namespace):
            if limit.roll():
                self._mark_dirty()
            reason = limit.exceeded()
            if reason is not None:
                return reason
        return None

    async def wait_change(self, namespace: str) -> None:
        """Until a limit of the namespace changes, is removed, or its period may have ended."""
        event = self._changed.setdefault(namespace, asyncio.Event())
        now = dt.datetime.now(dt.timezone.utc)
        midnight = (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        try:
            await asyncio.wait_for(event.wait(), (midnight - now).total_seconds() + 1)
        except TimeoutError:
            pass

    # -- persistence --

    async def load(self, namespaces: list[str]) -> None:
        """Read the SpendLimits of the watched namespaces ([] = all) before any task starts."""
        def read() -> list[dict]:
            if not namespaces:
                return self.custom.list_cluster_custom_object(GROUP, VERSION, SPENDLIMITS)["items"]
            return [item for ns in namespaces
                    for item in self.custom.list_namespaced_custom_object(GROUP, VERSION, ns, SPENDLIMITS)["items"]]

        try:
            bodies = await asyncio.to_thread(read)
        except ApiException as exc:
            if exc.status == 404:
                raise ConfigurationError("the SpendLimit CRD is not installed: `kubectl apply -k crds/` "
                                         "(manifests/ includes it)") from None
            raise
        for body in bodies:
            self.upsert(body)

    async def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_loop(), name="spendlimit-status")

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        await self.flush()

    async def flush(self) -> None:
        for limit in list(self._limits.values()):
            if not limit.dirty:
                continue
            limit.dirty = False
            try:
                await asyncio.to_thread(self.custom.patch_namespaced_custom_object_status, GROUP, VERSION,
                                        limit.namespace, SPENDLIMITS, limit.name, {"status": limit.status(self.replica)})
            except ApiException as exc:
                if exc.status == 404:
                    self._limits.pop((limit.namespace, limit.name), None)
                else:
                    limit.dirty = True
                    log.warning("SpendLimit %s/%s: cannot write status: %s %s", limit.namespace, limit.name,
                                exc.status, exc.reason)

    async def _flush_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            self._urgent.clear()
            await self.flush()
            # Rate limit: at most one write per limit per interval, but a crossing is said at once.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._urgent.wait(), self.flush_interval)

    # -- internals --

    def _in(self, namespace: str) -> list[_Limit]:
        return [limit for (ns, _), limit in self._limits.items() if ns == namespace]

    def _enforce(self, limit: _Limit) -> None:
        reason = limit.exceeded()
        if reason is not None:
            self.stop_namespace(limit.namespace, reason)

    def _signal(self, namespace: str) -> None:
        event = self._changed.pop(namespace, None)
        if event is not None:
            event.set()

    def _mark_dirty(self) -> None:
        self._dirty.set()
