"""The StatefulSet variant (manifests-fleet/): accepted by a real kube-apiserver, the same pod as
the Deployment's where it should be, and its RBAC enough for replicas running as the
ServiceAccount to share a task (real `reactor operator --fleet` processes, real opencode)."""

from __future__ import annotations

import json

import pytest

from reactor_dev.testing.fleet import all_terminal, apply_all, fix_task, fleet_args, wait_until
from reactor_dev.testing.operator_process import operators
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, edit, text
from reactor_dev.testing.repos import git, make_repo
from tests.deploy.conftest import EXAMPLES, MANIFESTS, SA_GROUPS, SA_USER, load_all, ok

FLEET = MANIFESTS.parent / "manifests-fleet"


def test_fleet_kustomization_passes_server_dry_run(reactor_system):
    out = reactor_system.kubectl("apply", "--dry-run=server", "-k", str(FLEET))
    ok(out)
    for kind_name in ("statefulset.apps/reactor", "service/reactor-replicas", "service/reactor", "role.rbac.authorization.k8s.io/reactor-leases",
                      "rolebinding.rbac.authorization.k8s.io/reactor-leases",
                      "clusterrole.rbac.authorization.k8s.io/reactor-agenttasks-fleet",
                      "rolebinding.rbac.authorization.k8s.io/reactor-agenttasks-fleet",
                      "clusterrole.rbac.authorization.k8s.io/reactor-agenttasks", "serviceaccount/reactor",
                      "customresourcedefinition.apiextensions.k8s.io/agenttasks.reactor.dev"):
        assert kind_name in out.stdout, out.stdout
    # One or the other: no single-replica Deployment nor its volume in the fleet variant.
    assert "deployment.apps/reactor" not in out.stdout and "persistentvolumeclaim/reactor-work" not in out.stdout
    assert "PodSecurity" not in out.stderr, out.stderr


def test_tenant_fleet_binding_passes_server_dry_run(reactor_system, namespace):
    ok(reactor_system.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(EXAMPLES / "tenant" / "rbac-fleet.yaml")))


def test_statefulset_runs_the_same_pod_as_the_deployment_plus_the_fleet_flags():
    deployment = load_all(MANIFESTS / "deployment.yaml")[0]["spec"]["template"]["spec"]
    statefulset_doc = load_all(FLEET / "statefulset.yaml")[0]
    statefulset = statefulset_doc["spec"]["template"]["spec"]
    # Same hardening, identity, image, probes, mounts; the work volume comes from a claim template.
    for key in ("serviceAccountName", "securityContext", "terminationGracePeriodSeconds"):
        assert statefulset[key] == deployment[key], key
    d, s = deployment["containers"][0], statefulset["containers"][0]
    for key in ("image", "securityContext", "livenessProbe", "ports", "volumeMounts"):
        assert s[key] == d[key], key
    assert [v for v in deployment["volumes"] if v["name"] != "work"] == statefulset["volumes"]
    assert [t["metadata"]["name"] for t in statefulset_doc["spec"]["volumeClaimTemplates"]] == ["work"]
    # Same environment, plus the pod's own name and namespace (the replica id, the Leases' namespace).
    d_env = {e["name"]: e for e in d["env"]}
    s_env = {e["name"]: e for e in s["env"]}
    assert {k: v for k, v in s_env.items() if k not in ("POD_NAME", "POD_NAMESPACE")} == d_env
    assert s_env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    args = s["args"]
    assert {"--fleet", "--replica-id=$(POD_NAME)", "--lease-namespace=$(POD_NAMESPACE)"} <= set(args)
    assert set(d["args"]) - {a for a in d["args"] if a.startswith("--max-agents=")} <= set(args)
    assert statefulset_doc["spec"]["podManagementPolicy"] == "Parallel"


def test_lease_rules_are_namespaced_and_minimal():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in load_all(FLEET / "rbac-fleet.yaml")}
    [rule] = docs[("Role", "reactor-leases")]["rules"]
    assert rule["apiGroups"] == ["coordination.k8s.io"] and rule["resources"] == ["leases"]
    assert set(rule["verbs"]) == {"get", "list", "create", "update", "patch", "delete"}
    [rule] = docs[("ClusterRole", "reactor-agenttasks-fleet")]["rules"]
    assert rule["verbs"] == ["get"] and rule["resources"] == ["agenttasks"]
    assert not any(kind == "ClusterRoleBinding" for kind, _ in docs)


@pytest.mark.opencode
def test_two_replicas_as_the_serviceaccount_share_tasks_with_the_shipped_rbac(reactor_system, namespace, tmp_path):
    """The replicas' Leases live in reactor-system (the Role there), the tasks in a tenant
    namespace bound with examples/tenant/rbac.yaml and rbac-fleet.yaml."""
    cluster = reactor_system
    ok(cluster.kubectl("apply", "-f", str(FLEET / "rbac-fleet.yaml")))
    ok(cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLES / "tenant" / "rbac.yaml"),
                       "-f", str(EXAMPLES / "tenant" / "rbac-fleet.yaml")))
    kubeconfig = cluster.kubeconfig_for(SA_USER, SA_GROUPS, tmp_path / "sa.kubeconfig")
    origin = make_repo(tmp_path / "origin")
    names = ["shared-a", "shared-b", "shared-c"]
    with operators(cluster, namespace, tmp_path / "unused", kubeconfig=kubeconfig) as start, \
            ScriptedModel([Scenario(f"{n}:", [edit("calc.py", "return a - b", "return a + b"), text("Fixed.")])
                           for n in names]) as model:
        replicas = [start(*fleet_args(i, "reactor-system", 6, "--max-agents=1"), work_dir=tmp_path / f"r{i}")
                    for i in range(2)]
        apply_all(cluster, namespace, [fix_task(n, origin, model.opencode_config()) for n in names])
        objs = wait_until(lambda: all_terminal(cluster, namespace, len(names)), 300, "all terminal",
                          lambda: "\n".join(r.log() for r in replicas))
        holders = lease_holders(cluster)
    after = lease_holders(cluster)
    assert {o["status"]["phase"] for o in objs.values()} == {"Succeeded"}, \
        {n: o["status"].get("message") for n, o in objs.items()}
    for name, obj in objs.items():
        assert obj["status"]["result"]["commit"] == git(origin, "rev-parse", f"reactor/{name}")
    assert {o["status"]["claim"]["replica"] for o in objs.values()} <= {"r0", "r1"}
    assert objs["shared-a"]["metadata"]["finalizers"] == ["reactor.dev/cleanup"]
    # Each replica held its Lease in reactor-system while it ran, and gave it up on SIGTERM.
    assert set(holders) == {"reactor-replica-r0", "reactor-replica-r1"}
    assert holders["reactor-replica-r0"].startswith("r0.") and holders["reactor-replica-r1"].startswith("r1.")
    assert after == {}


def lease_holders(cluster) -> dict[str, str]:
    leases = json.loads(ok(cluster.kubectl("get", "-n", "reactor-system", "leases", "-o", "json")))["items"]
    return {lease["metadata"]["name"]: lease["spec"].get("holderIdentity") for lease in leases
            if lease["metadata"]["name"].startswith("reactor-replica-")}
