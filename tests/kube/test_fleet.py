"""Replicas coordinating through a real kube-apiserver: Leases, claims that fail on conflict,
expiry, fencing (no opencode: seconds)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import kubernetes
import pytest

from reactor.kube.fleet import LEASE_PREFIX, ClaimLost, FleetSettings, ReplicaLeases
from reactor.kube.resource import GROUP, PLURAL, VERSION, ClaimStatus, TaskRef
from reactor.kube.status import StatusWriter, TaskStatus
from reactor_dev.testing.tasks import agent_task

LEASE = 4.0  # seconds: short, but renewals (every 0.8 s) survive a busy 2-core machine


def api_client(cluster, server: str | None = None) -> kubernetes.client.ApiClient:
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(cluster.kubeconfig_path), client_configuration=configuration)
    if server is not None:
        configuration.host = server
    return kubernetes.client.ApiClient(configuration)


@pytest.fixture
def task(crd_installed, namespace, kube_api) -> TaskRef:
    custom = kubernetes.client.CustomObjectsApi(kube_api)
    body = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, agent_task("shared"))
    return TaskRef.from_body(body)


def status_of(kube_api, ref: TaskRef) -> dict:
    body = kubernetes.client.CustomObjectsApi(kube_api).get_namespaced_custom_object(
        GROUP, VERSION, ref.namespace, PLURAL, ref.name)
    return body.get("status") or {}


def bootstrapping(body: dict) -> dict:
    return {"phase": "Bootstrapping", "attempts": int((body.get("status") or {}).get("attempts") or 0) + 1}


async def started(cluster, namespace: str, replica: str, **kwargs) -> ReplicaLeases:
    fleet = ReplicaLeases(api_client(cluster, kwargs.pop("server", None)), FleetSettings(replica, namespace, LEASE),
                          **kwargs)
    await fleet.start()
    return fleet


def writer(fleet: ReplicaLeases) -> StatusWriter:
    """Status writes as the operator makes them: fenced by this replica's claims."""
    return StatusWriter(fleet.custom.api_client, fence=fleet)


async def claim_task(fleet: ReplicaLeases, task: TaskRef, first_status=None):
    """Claim as the supervisor does: the claim written through the task's TaskStatus."""
    status = TaskStatus(writer(fleet), task, None, claimed=False)
    return await fleet.claim(task, first_status or bootstrapping, status.claim)


async def test_a_replica_heartbeats_its_lease_and_gives_it_up_on_stop(crd_installed, namespace, kube_api):
    coordination = kubernetes.client.CoordinationV1Api(kube_api)
    fleet = await started(crd_installed, namespace, "r0")
    try:
        lease = coordination.read_namespaced_lease(LEASE_PREFIX + "r0", namespace)
        assert lease.spec.holder_identity == fleet.holder and fleet.holder.startswith("r0.")
        assert lease.spec.lease_duration_seconds == int(LEASE)
        first = lease.spec.renew_time
        deadline = time.monotonic() + LEASE
        while coordination.read_namespaced_lease(LEASE_PREFIX + "r0", namespace).spec.renew_time == first:
            assert time.monotonic() < deadline, "the Lease was not renewed"
            await asyncio.sleep(0.1)
        assert fleet.holds_lease() and fleet.replicas() == {"r0": True}
    finally:
        await fleet.stop()
    with pytest.raises(kubernetes.client.ApiException) as gone:
        coordination.read_namespaced_lease(LEASE_PREFIX + "r0", namespace)
    assert gone.value.status == 404


async def test_exactly_one_of_racing_replicas_claims_a_task(crd_installed, namespace, kube_api, task):
    fleets = [await started(crd_installed, namespace, f"r{i}") for i in range(5)]
    try:
        results = await asyncio.gather(*(claim_task(fleet, task) for fleet in fleets))
        winners = [fleet for fleet, result in zip(fleets, results, strict=True) if result is not None]
        # (A replica that fenced itself meanwhile would rightly lose its claim to another.)
        assert [fleet.fences for fleet in fleets] == [0] * 5
        assert len(winners) == 1, [r is not None for r in results]
        status = status_of(kube_api, task)
        assert status["claim"]["replica"] == winners[0].replica and status["claim"]["holder"] == winners[0].holder
        assert status["phase"] == "Bootstrapping" and status["attempts"] == 1, "one claim, one attempt"
        for fleet in fleets:
            await fleet.refresh()
            assert fleet.claim_alive(ClaimStatus.model_validate(status["claim"]))
        # The winner writes; the others may not (the server tests the claim's holder).
        await writer(winners[0]).patch(task, {"phase": "Executing", "cell": None})
        for loser in (f for f in fleets if f is not winners[0]):
            with pytest.raises(ClaimLost):
                await writer(loser).patch(task, {"phase": "Failed"})
        assert status_of(kube_api, task)["phase"] == "Executing"
    finally:
        for fleet in fleets:
            await fleet.stop()


async def test_a_stale_read_cannot_claim(crd_installed, namespace, kube_api, task):
    """The claim carries the resourceVersion it read: anything written in between (here a
    plain status change) makes the API server refuse it, and the claimer reads again."""
    fleet = await started(crd_installed, namespace, "r0")
    custom = kubernetes.client.CustomObjectsApi(kube_api)
    calls = []

    def first_status(body: dict) -> dict:
        calls.append(body["metadata"]["resourceVersion"])
        if len(calls) == 1:  # someone else writes right after our read
            custom.patch_namespaced_custom_object_status(GROUP, VERSION, task.namespace, PLURAL, task.name,
                                                         {"status": {"message": "touched"}})
        return bootstrapping(body)

    try:
        assert await claim_task(fleet, task, first_status) is not None
        assert len(calls) == 2 and calls[0] != calls[1], "the first write was refused (409) and retried"
    finally:
        await fleet.stop()


async def test_the_server_refuses_a_holders_write_once_the_claim_moved(crd_installed, namespace, kube_api, task):
    fleet = await started(crd_installed, namespace, "r0")
    try:
        assert await claim_task(fleet, task)
        # Another replica adopts it (as it would after this one's Lease expired).
        kubernetes.client.CustomObjectsApi(kube_api).patch_namespaced_custom_object_status(
            GROUP, VERSION, task.namespace, PLURAL, task.name,
            {"status": {"claim": {"replica": "r9", "holder": "r9.adopter", "since": "2030-01-01T00:00:00.000000Z"}}})
        assert fleet.holds(task), "locally it still believes it holds the task"
        with pytest.raises(ClaimLost):
            await writer(fleet).patch(task, {"phase": "Succeeded"})
        assert status_of(kube_api, task)["phase"] == "Bootstrapping"
        assert not await fleet.confirm(task, margin=0)
    finally:
        await fleet.stop()


MEMBER = """
import asyncio, sys, kubernetes
from reactor.kube.fleet import FleetSettings, ReplicaLeases
from reactor.kube.resource import TaskRef
from reactor.kube.status import StatusWriter, TaskStatus

async def main(kubeconfig, namespace, replica, name, uid, lease):
    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=config)
    api = kubernetes.client.ApiClient(config)
    fleet = ReplicaLeases(api, FleetSettings(replica, namespace, float(lease)))
    ref = TaskRef(namespace, name, uid, "")
    # Built before the Lease is taken, as the operator does: the client's first CoreV1Api
    # is a slow import, which would hold the event loop past the fence.
    status = TaskStatus(StatusWriter(api, fence=fleet), ref, None, claimed=False)
    await fleet.start()
    won = await fleet.claim(ref, lambda body: {"phase": "Bootstrapping"}, status.claim)
    print("claimed" if won else "lost", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(*sys.argv[1:]))
"""


async def test_a_killed_replicas_claim_is_adoptable_only_after_its_lease_expires(crd_installed, namespace, task):
    member = subprocess.Popen([sys.executable, "-c", MEMBER, str(crd_installed.kubeconfig_path), namespace, "r0",
                               task.name, task.uid, str(LEASE)], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert member.stdout.readline().strip() == "claimed"
        adopter = await started(crd_installed, namespace, "r1")
        os.killpg(member.pid, signal.SIGKILL)
        killed = time.monotonic()
        member.wait()
        try:
            while (await claim_task(adopter, task)) is None:
                assert time.monotonic() - killed < 3 * LEASE, "never adopted"
                await asyncio.sleep(0.1)
            waited = time.monotonic() - killed
            # Not before the full Lease duration (counted from the last renewal it saw, which
            # came before the kill by at most one renew interval).
            assert waited >= LEASE - LEASE / 5, f"adopted after {waited:.2f}s"
            assert adopter.replicas() == {"r0": False, "r1": True}
            print(f"\nkilled -> adopted: {waited:.2f}s (Lease {LEASE:g}s)")
        finally:
            await adopter.stop()
    finally:
        if member.poll() is None:
            os.killpg(member.pid, signal.SIGKILL)
            member.wait()


class Partition:
    """A TCP proxy to the API server that the test can cut: a replica behind it keeps running
    but can no longer reach the API server."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.connections: set[asyncio.StreamWriter] = set()
        self.cut = False

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"https://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader, writer):
        if self.cut:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.connections |= {writer, up_writer}

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def sever(self) -> None:
        self.cut = True
        for writer in self.connections:
            writer.close()

    async def stop(self) -> None:
        self.sever()
        self.server.close()


async def test_a_partitioned_replica_fences_itself_before_its_lease_expires_for_others(crd_installed, namespace, task):
    port = int(crd_installed.server_url.rsplit(":", 1)[1])
    partition = Partition(port)
    fenced_at: list[float] = []

    async def on_fenced() -> None:
        fenced_at.append(time.monotonic())

    isolated = await started(crd_installed, namespace, "r0", server=await partition.start(), on_fenced=on_fenced)
    observer = await started(crd_installed, namespace, "r1")
    try:
        assert await claim_task(isolated, task)
        claim = ClaimStatus.model_validate((await observer.read(task))["status"]["claim"])
        partition.sever()
        cut = time.monotonic()
        while observer.claim_alive(claim):
            assert time.monotonic() - cut < 3 * LEASE, "the claim never expired"
            await asyncio.sleep(0.05)
        expired = time.monotonic()
        assert fenced_at, "the partitioned replica did not fence itself"
        assert fenced_at[0] < expired, "it stopped its cells before any other replica could adopt its tasks"
        assert not isolated.holds(task) and isolated.fences == 1
        with pytest.raises(ClaimLost):
            await writer(isolated).patch(task, {"phase": "Succeeded"})
        print(f"\npartition -> fenced {fenced_at[0] - cut:.2f}s, -> expired for others {expired - cut:.2f}s")
    finally:
        await isolated.stop()
        await observer.stop()
        await partition.stop()


async def test_a_restarted_replica_takes_its_lease_over_and_its_old_claims_die(crd_installed, namespace, task):
    first = await started(crd_installed, namespace, "r0")
    assert await claim_task(first, task)
    old_claim = ClaimStatus.model_validate((await first.read(task))["status"]["claim"])
    for running in first._tasks:  # the process "dies": no stop(), the Lease stays behind
        running.cancel()
    second = await started(crd_installed, namespace, "r0")
    try:
        assert second.holder != old_claim.holder
        assert not second.claim_alive(old_claim), "an earlier incarnation's claim is dead at once"
        result = await claim_task(second, task)
        assert result is not None and result[1]["attempts"] == 2
    finally:
        await second.stop()


def test_claim_columns_in_kubectl_wide(crd_installed, namespace, kube_api, task):
    kubernetes.client.CustomObjectsApi(kube_api).patch_namespaced_custom_object_status(
        GROUP, VERSION, task.namespace, PLURAL, task.name,
        {"status": {"phase": "Executing",
                    "claim": {"replica": "reactor-2", "holder": "reactor-2.ab12", "since": "2024-01-01T00:00:00.123456Z"}}})
    out = crd_installed.kubectl("get", "-n", namespace, "agenttasks", "-o", "wide")
    header, row = out.stdout.splitlines()[:2]
    assert "REPLICA" in header and "CLAIMED" in header, header
    assert "reactor-2" in row
    assert json.loads(crd_installed.kubectl("get", "-n", namespace, "agenttask", "shared", "-o", "json").stdout)[
        "status"]["claim"]["since"] == "2024-01-01T00:00:00.123456Z"
