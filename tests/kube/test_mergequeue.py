"""MergeQueues on a real kube-apiserver: the record in status, tasks' status.integration,
the columns of `kubectl get mergequeues`, metrics, one driver per queue through its Lease,
and a second replica taking the queue over from the record when the first dies (real git, confined test runs; no
opencode: the tasks' runs are stood in for by their status)."""

from __future__ import annotations

import asyncio
import datetime as dt

import kubernetes

from reactor.infra.mirrors import RepositoryMirrors
from reactor.infra.repository_urls import RepositoryPolicy
from reactor.kube.mergequeues import LEASE_PREFIX, MergeQueues
from reactor.observe.fleet import TaskViews
from reactor.observe.metrics import Metrics
from reactor.kube.resource import GROUP, MERGEQUEUES, PLURAL, VERSION, AgentTaskSpec, TaskRef
from reactor_dev.testing.helpers import until
from reactor_dev.testing.mergequeue import TEST_COMMAND, base_history, confined_tests, failing_commits, git, \
    make_queue_repo, make_result, module
from reactor_dev.testing.tasks import agent_task


def finished_task(custom, namespace: str, name: str, origin, changes: dict) -> TaskRef:
    """An AgentTask whose run succeeded and pushed its result (as the supervisor leaves it)."""
    body = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, agent_task(
        name, origin, test={"command": TEST_COMMAND}, integrate="queue"))
    commit, _ = make_result(origin, name, changes)
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, {"status": {
        "phase": "Succeeded", "completionTime": now,
        "result": {"outcome": "committed", "commit": commit, "pushed": True, "branch": f"reactor/{name}"}}})
    return TaskRef.from_body(body)


def integration(custom, namespace: str, name: str) -> dict:
    body = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    return (body.get("status") or {}).get("integration") or {}


async def test_a_merge_queue_integrates_tasks_and_another_replica_takes_it_over(
        crd_installed, namespace, kube_api, tmp_path, work_dir):
    custom = kubernetes.client.CustomObjectsApi(kube_api)
    origin = make_queue_repo(tmp_path / "origin", {"shared.py": "VALUE = 1\n"})
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, MERGEQUEUES, {
        "apiVersion": "reactor.dev/v1alpha1", "kind": "MergeQueue", "metadata": {"name": "main"},
        "spec": {"repository": {"url": f"file://{origin}", "branch": "main"}, "maxBatch": 2}})
    metrics = [Metrics(TaskViews()) for _ in range(2)]
    replicas = [MergeQueues(kube_api, confined_tests(work_dir), RepositoryMirrors(work_dir / f"r{i}" / "mirrors",
                                                                        RepositoryPolicy(work_dir, (tmp_path,))),
                            identity=f"r{i}", lease_duration=4.0, poll_interval=0.3, metrics=metrics[i])
                for i in range(2)]
    body = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, MERGEQUEUES, "main")
    try:
        for replica in replicas:
            replica.upsert(body)
        tasks = {"a": {"shared.py": "VALUE = 2\n"}, "b": {"b.py": module("b")}, "c": {"shared.py": "VALUE = 3\n"}}
        for name, changes in tasks.items():
            ref = finished_task(custom, namespace, name, origin, changes)
            await replicas[0].submit(ref, AgentTaskSpec.model_validate(
                custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)["spec"]))
        await until(lambda: all(integration(custom, namespace, n).get("state") in ("Integrated", "Ejected")
                                     for n in tasks), 90, "every task integrated or ejected")
        a, b, c = (integration(custom, namespace, n) for n in "abc")
        assert (a["state"], b["state"], c["state"]) == ("Integrated", "Integrated", "Ejected")
        assert c["reason"] == "TextualConflict" and "shared.py" in c["message"]
        drivers = [r for r in replicas if r.holding()]
        assert len(drivers) == 1, "one replica drives the queue"
        lease = kubernetes.client.CoordinationV1Api(kube_api).read_namespaced_lease(LEASE_PREFIX + "main", namespace)
        assert lease.spec.holder_identity == drivers[0].identity
        table = await asyncio.to_thread(crd_installed.kubectl, "get", "mergequeues", "-n", namespace)
        assert table.stdout.split("\n")[0].split() == ["NAME", "BRANCH", "DEPTH", "HEAD", "LAST-INTEGRATION",
                                                       "BASE-GREEN", "AGE"]
        assert table.stdout.split("\n")[1].split()[:3] == ["main", "main", "0"]
        assert git(origin, "rev-parse", "main").startswith(table.stdout.split("\n")[1].split()[3])
        assert b["baseCommit"] == git(origin, "rev-parse", "main")
        # (in a thread: the drivers' heartbeats run in this event loop meanwhile)
        assert await asyncio.to_thread(failing_commits, origin, base_history(origin)) == []

        sample = metrics[replicas.index(drivers[0])].registry.get_sample_value
        labels = {"namespace": namespace, "queue": "main"}
        assert sample("reactor_mergequeue_results_total", {**labels, "outcome": "integrated", "reason": ""}) == 2
        assert sample("reactor_mergequeue_results_total", {**labels, "outcome": "ejected",
                                                           "reason": "TextualConflict"}) == 1
        assert sample("reactor_mergequeue_integration_seconds_count", labels) == 2
        assert sample("reactor_mergequeue_test_runs_total", labels) >= 1
        assert sample("reactor_mergequeue_depth", labels) == 0

        # The driver dies without giving its Lease up; once the Lease has expired the other
        # replica takes the queue over, from the record.
        await drivers[0].stop(release=False)
        other = next(r for r in replicas if r is not drivers[0])
        ref = finished_task(custom, namespace, "d", origin, {"d.py": module("d")})
        await other.submit(ref, AgentTaskSpec.model_validate(
            custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "d")["spec"]))
        await until(lambda: integration(custom, namespace, "d").get("state") == "Integrated", 60,
                         "the other replica integrates d")
        status = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, MERGEQUEUES, "main")["status"]
        assert status["holder"] == other.identity and status["integrated"] == 3 and status["baseGreen"] is True
        assert [e["id"].rpartition(".")[0] for e in status["record"]["entries"]] == ["a", "b", "c", "d"]
        log = git(origin, "log", "--format=%B", "main")
        assert [log.count(f"Reactor-Queue-Entry: {n}.") for n in "abcd"] == [1, 1, 0, 1]
    finally:
        for replica in replicas:
            await replica.stop()
