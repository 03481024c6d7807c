"""One SpendLimit shared by several replicas, on the real API server (no opencode: seconds).

Each replica counts the steps of the tasks it runs and writes only its own entry of the
limit's status; a namespace cap must hold for the sum, not per replica."""

from __future__ import annotations

import asyncio

import kubernetes
import pytest

from reactor.kube.resource import GROUP, SPENDLIMITS, VERSION
from reactor.kube.spendlimits import SpendLimits
from reactor.observe.fleet import SpendLedger

pytestmark = pytest.mark.kube


def read(kube_api, namespace: str) -> dict:
    return kubernetes.client.CustomObjectsApi(kube_api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, SPENDLIMITS, "team-cap")


def test_replicas_add_up_their_spend_and_both_stop_at_the_shared_cap(crd_installed, namespace, kube_api):
    kubernetes.client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, SPENDLIMITS,
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SpendLimit", "metadata": {"name": "team-cap"},
         "spec": {"maxCost": "1.00"}})
    stopped: dict[str, list[str]] = {"a": [], "b": []}

    def replica(name: str) -> tuple[SpendLimits, SpendLedger]:
        ledger = SpendLedger()
        limits = SpendLimits(kube_api, ledger, lambda ns, message: stopped[name].append(message), replica=name)
        limits.upsert(read(kube_api, namespace))
        return limits, ledger

    async def scenario() -> None:
        (a, ledger_a), (b, ledger_b) = replica("a"), replica("b")
        # Both write at once: neither write may erase the other's count.
        ledger_a.add(namespace, 0.6, 1000)
        ledger_b.add(namespace, 0.3, 500)
        await asyncio.gather(a.flush(), b.flush())
        status = read(kube_api, namespace)["status"]
        assert status["replicas"]["a"]["spentCost"] == pytest.approx(0.6)
        assert status["replicas"]["b"]["spentCost"] == pytest.approx(0.3)
        # Within the cap together ($0.90): nobody is held or stopped.
        for limits in (a, b):
            limits.upsert(read(kube_api, namespace))  # what each replica's watch delivers
            assert limits.blocked(namespace) is None
        assert stopped == {"a": [], "b": []}

        ledger_b.add(namespace, 0.2, 300)  # b alone is at $0.50, the namespace at $1.10
        assert a.blocked(namespace) is None, "a has not heard of b's step yet"
        await b.flush()
        assert "1.1000 spent of maxCost $1" in (b.blocked(namespace) or "")
        a.upsert(read(kube_api, namespace))
        assert "1.1000 spent of maxCost $1" in (a.blocked(namespace) or "")
        assert stopped["a"] and stopped["b"], "each replica stops its own running tasks of the namespace"
        await a.flush()
        status = read(kube_api, namespace)["status"]
        assert status["exceeded"] is True and status["spentCost"] == pytest.approx(1.1)

        # A restarted replica takes its own count back, not the namespace's total.
        again, _ = replica("a")
        assert again._limits[(namespace, "team-cap")].cost == pytest.approx(0.6)
        assert again.blocked(namespace) is not None

    asyncio.run(scenario())
