"""The operator runs as its ServiceAccount with only the shipped RBAC: a client-certificate
kubeconfig for system:serviceaccount:reactor-system:reactor, manifests/rbac.yaml applied,
and examples/tenant/rbac.yaml bound in the test namespace exactly as its header says.
A real `reactor operator` process, real opencode servers, real git, the scripted model."""

from __future__ import annotations

import json
import textwrap
import time

import pytest
import yaml

from reactor_dev.devcluster.controlplane import ControlPlane
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, bash, text
from reactor_dev.testing.repos import git, make_repo
from tests.deploy.conftest import EXAMPLES, MANIFESTS, SA_GROUPS, SA_USER, load_all, ok
from tests.kube.conftest import install_crds
from reactor_dev.testing.operator_process import OperatorProcess, operators
from tests.kube.test_operator import task_manifest

TENANT_RBAC = EXAMPLES / "tenant" / "rbac.yaml"
# The agent proves the task's Secret reached its server's environment: the fix only
# happens when the variable holds the Secret's value.
FIX_IF_SECRET = bash('test "$REACTOR_E2E_TOKEN" = s3cret && sed -i "s/return a - b/return a + b/" calc.py')


@pytest.fixture
def app_repo(tmp_path):
    return make_repo(tmp_path / "app")


@pytest.fixture
def as_serviceaccount(reactor_system, namespace, work_dir, tmp_path):
    """Start the operator as the ServiceAccount, watching the test namespace."""
    cluster = reactor_system
    kubeconfig = cluster.kubeconfig_for(SA_USER, SA_GROUPS, tmp_path / "reactor-sa.kubeconfig")
    with operators(cluster, namespace, work_dir, kubeconfig=kubeconfig) as start:
        yield start


def can_i(cluster, namespace: str, verb: str, resource: str) -> bool:
    out = cluster.kubectl("auth", "can-i", verb, resource, "-n", namespace, f"--as={SA_USER}",
                          *(f"--as-group={g}" for g in SA_GROUPS))
    return out.stdout.strip() == "yes"


def test_serviceaccount_gets_exactly_the_documented_permissions(reactor_system, namespace):
    cluster = reactor_system
    ok(cluster.kubectl("apply", "-n", namespace, "-f", str(TENANT_RBAC)))
    granted = [("list", "agenttasks.reactor.dev"), ("watch", "agenttasks.reactor.dev"),
               ("patch", "agenttasks.reactor.dev"), ("patch", "agenttasks.reactor.dev/status"),
               ("list", "spendlimits.reactor.dev"), ("watch", "spendlimits.reactor.dev"),
               ("patch", "spendlimits.reactor.dev"), ("patch", "spendlimits.reactor.dev/status"),
               ("create", "events"), ("get", "secrets/model-api-keys"), ("get", "secrets/git-credentials")]
    denied = [("get", "agenttasks.reactor.dev"), ("update", "agenttasks.reactor.dev"),
              ("delete", "agenttasks.reactor.dev"), ("create", "agenttasks.reactor.dev"),
              ("update", "agenttasks.reactor.dev/status"), ("get", "secrets/another-secret"),
              ("list", "secrets"), ("watch", "secrets"), ("create", "secrets"), ("list", "events"),
              ("get", "pods"), ("create", "pods"), ("list", "namespaces"),
              ("list", "customresourcedefinitions.apiextensions.k8s.io")]
    for verb, resource in granted:
        assert can_i(cluster, namespace, verb, resource), f"{verb} {resource} in {namespace} should be granted"
    for verb, resource in denied:
        assert not can_i(cluster, namespace, verb, resource), f"{verb} {resource} in {namespace} should be denied"
    # Nothing outside the namespaces it is bound in (nor cluster-wide).
    for verb, resource in granted:
        assert not can_i(cluster, "default", verb, resource), f"{verb} {resource} leaks into namespace default"
    out = cluster.kubectl("auth", "can-i", "list", "agenttasks.reactor.dev", "--all-namespaces", f"--as={SA_USER}")
    assert out.stdout.strip() == "no"


@pytest.mark.opencode
def test_operator_as_serviceaccount_runs_a_task_to_succeeded(as_serviceaccount, reactor_system, namespace, app_repo):
    cluster = reactor_system
    ok(cluster.kubectl("apply", "-n", namespace, "-f", str(TENANT_RBAC)))
    ok(cluster.kubectl("create", "secret", "generic", "model-api-keys", "-n", namespace,
                       "--from-literal=REACTOR_E2E_TOKEN=s3cret"))
    # A Secret that exists but is not under the Role's resourceNames.
    ok(cluster.kubectl("create", "secret", "generic", "unlisted", "-n", namespace, "--from-literal=X=1"))
    op = as_serviceaccount()
    main_before = git(app_repo, "rev-parse", "main")
    with ScriptedModel([Scenario("rbac-ok:", [FIX_IF_SECRET, text("Fixed.")])]) as model:
        good = task_manifest("rbac-ok", app_repo, model, agent={
            "config": model.opencode_config(), "envFrom": [{"secretRef": {"name": "model-api-keys"}}]})
        denied = task_manifest("rbac-unlisted-secret", app_repo, model, agent={
            "config": model.opencode_config(), "envFrom": [{"secretRef": {"name": "unlisted"}}]})
        applied = time.monotonic()
        ok(cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(good)))
        ok(cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(denied)))
        obj = op.wait_terminal("rbac-ok", timeout=300)
        print(f"\napply -> {obj['status']['phase']} as the ServiceAccount: {time.monotonic() - applied:.1f}s")
        refused = op.wait_terminal("rbac-unlisted-secret", timeout=60)

    status = obj["status"]
    assert status["phase"] == "Succeeded", f"{json.dumps(status, indent=1)}\noperator log:\n{op.log()}"
    assert status["result"]["pushed"] is True and status["result"]["filesChanged"] == ["calc.py"]
    assert status["result"]["commit"] == git(app_repo, "rev-parse", "reactor/rbac-ok")
    assert git(app_repo, "rev-parse", "main") == main_before
    # (Events carry one-second timestamps: check the set, not the order.)
    reasons = {e["reason"] for e in op.events("rbac-ok")}
    assert {"Bootstrapping", "Executing", "Testing", "Committing", "Succeeded"} <= reasons, reasons
    assert "reactor.dev/cleanup" in obj["metadata"]["finalizers"]
    assert "reactor.dev/last-handled-configuration" in obj["metadata"]["annotations"]

    # A Secret the Role does not list: the task fails and says which rule is missing.
    condition = next(c for c in refused["status"]["conditions"] if c["type"] == "Succeeded")
    assert refused["status"]["phase"] == "Failed" and condition["reason"] == "InvalidInput", refused["status"]
    assert "may not read secret 'unlisted'" in condition["message"] and "RBAC: secrets get" in condition["message"]

    # Deletion: the operator (as the ServiceAccount) removes its finalizer.
    ok(cluster.kubectl("delete", "-n", namespace, "agenttask", "rbac-ok", "rbac-unlisted-secret", "--timeout=30s"))
    assert op.get("rbac-ok") is None and op.get("rbac-unlisted-secret") is None


@pytest.mark.opencode
def test_without_the_status_rule_the_operator_names_the_missing_permission(
        as_serviceaccount, reactor_system, namespace, app_repo):
    """The shipped rules minus `patch agenttasks/status`, bound the same way."""
    cluster = reactor_system
    role = next(d for d in load_all(MANIFESTS / "rbac.yaml") if d["kind"] == "ClusterRole")
    role["metadata"]["name"] = f"reactor-agenttasks-without-status-{namespace}"
    role["rules"] = [r for r in role["rules"] if r["resources"] != ["agenttasks/status"]]
    assert len(role["rules"]) == 4
    bindings = load_all(TENANT_RBAC)
    for doc in bindings:
        if doc["kind"] == "RoleBinding" and doc["roleRef"]["name"] == "reactor-agenttasks":
            doc["roleRef"]["name"] = role["metadata"]["name"]
    ok(cluster.kubectl("apply", "-f", "-", input=json.dumps(role)))
    try:
        ok(cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(bindings)))
        op = as_serviceaccount()
        with ScriptedModel([Scenario("no-status:", [text("Nothing to do.")])]) as model:
            ok(cluster.kubectl("apply", "-n", namespace, "-f", "-",
                               input=json.dumps(task_manifest("no-status", app_repo, model))))
            expected = 'cannot patch resource "agenttasks/status" in API group "reactor.dev"'
            deadline = time.monotonic() + 180
            while expected not in op.log_path.read_text(errors="replace"):
                assert time.monotonic() < deadline, f"no 403 naming agenttasks/status in the log:\n{op.log()}"
                time.sleep(0.2)
        log = op.log_path.read_text(errors="replace")
        line = next(line for line in log.splitlines() if expected in line)
        print(f"\noperator log: {line[:400]}")
        assert line.count("RBAC: ") == 1 and "grant `patch` on agenttasks/status" in line
        assert SA_USER in line and f'namespace "{namespace}"' in line
        # Events may still be created: the user sees the cause on the task itself too.
        warnings = [e for e in op.events("no-status") if e["reason"] == "Forbidden" and e["type"] == "Warning"]
        assert warnings and "grant `patch` on agenttasks/status" in warnings[0]["message"]
        assert ((op.get("no-status") or {}).get("status") or {}).get("phase") is None
    finally:
        cluster.kubectl("delete", "agenttasks", "--all", "-n", namespace, "--wait=true", "--timeout=30s")
        cluster.kubectl("delete", "clusterrole", role["metadata"]["name"])


AUDIT_POLICY = textwrap.dedent(f"""\
    apiVersion: audit.k8s.io/v1
    kind: Policy
    rules:
      - level: Metadata
        users: ["{SA_USER}"]
        omitStages: [RequestReceived]
      - level: None
""")
# What the shipped rules grant, as (verb, group, resource/subresource).
GRANTED = {("list", "reactor.dev", "agenttasks"), ("watch", "reactor.dev", "agenttasks"),
           ("patch", "reactor.dev", "agenttasks"), ("patch", "reactor.dev", "agenttasks/status"),
           ("list", "reactor.dev", "spendlimits"), ("watch", "reactor.dev", "spendlimits"),
           ("patch", "reactor.dev", "spendlimits"), ("patch", "reactor.dev", "spendlimits/status"),
           ("create", "", "events"), ("get", "", "secrets")}
# kopf's optional run-time observation of CRDs and namespaces (cluster-scoped, not granted):
# denied, it retries and falls back; with settings.scanning.disabled it is not attempted.
OPTIONAL = {("list", "apiextensions.k8s.io", "customresourcedefinitions"), ("list", "", "namespaces"),
            ("watch", "apiextensions.k8s.io", "customresourcedefinitions"), ("watch", "", "namespaces")}


@pytest.mark.opencode
def test_the_audit_log_shows_every_rule_used_and_nothing_else_needed(kube_assets, work_dir, tmp_path, app_repo):
    """The measurement behind manifests/README.md: a control plane of its own with an audit
    log of the ServiceAccount's requests, one task run to Succeeded and deleted."""
    policy = tmp_path / "audit-policy.yaml"
    policy.write_text(AUDIT_POLICY)
    audit = tmp_path / "audit.log"
    cluster = ControlPlane(kube_assets, apiserver_args=[f"--audit-policy-file={policy}", f"--audit-log-path={audit}"])
    cluster.start()
    op = None
    try:
        namespace = "tenant-a"
        ok(cluster.kubectl("create", "namespace", namespace))
        install_crds(cluster)
        for name in ("namespace.yaml", "serviceaccount.yaml", "rbac.yaml"):
            ok(cluster.kubectl("apply", "-f", str(MANIFESTS / name)))
        ok(cluster.kubectl("apply", "-n", namespace, "-f", str(TENANT_RBAC)))
        ok(cluster.kubectl("create", "secret", "generic", "model-api-keys", "-n", namespace,
                           "--from-literal=REACTOR_E2E_TOKEN=s3cret"))
        # A namespace spend cap the task stays within: its rules are used too.
        ok(cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({
            "apiVersion": "reactor.dev/v1alpha1", "kind": "SpendLimit", "metadata": {"name": "cap"},
            "spec": {"maxCost": "100"}})))
        kubeconfig = cluster.kubeconfig_for(SA_USER, SA_GROUPS, tmp_path / "reactor-sa.kubeconfig")
        op = OperatorProcess(cluster, namespace, work_dir, kubeconfig=kubeconfig).start()
        with ScriptedModel([Scenario("audited:", [FIX_IF_SECRET, text("Fixed.")])]) as model:
            task = task_manifest("audited", app_repo, model, agent={
                "config": model.opencode_config(), "envFrom": [{"secretRef": {"name": "model-api-keys"}}]})
            ok(cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(task)))
            obj = op.wait_terminal("audited", timeout=300)
        assert obj["status"]["phase"] == "Succeeded", obj["status"]
        ok(cluster.kubectl("delete", "-n", namespace, "agenttask", "audited", "--timeout=30s"))
        op.stop()
        op = None
    finally:
        if op is not None:
            op.stop()
        cluster.stop()

    allowed, denied, secrets_read = set(), set(), set()
    for line in audit.read_text().splitlines():
        event = json.loads(line)
        ref = event.get("objectRef")
        if ref is None:
            continue  # discovery (/api, /apis/...): open to every authenticated user
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        call = (event["verb"], ref.get("apiGroup", ""), resource)
        (denied if event["responseStatus"]["code"] == 403 else allowed).add(call)
        if ref["resource"] == "secrets":
            secrets_read.add((ref.get("namespace"), ref.get("name")))
    print(f"\nallowed: {sorted(allowed)}\ndenied: {sorted(denied)}")
    assert allowed == GRANTED, "every shipped rule is used, and nothing else is"
    assert denied <= OPTIONAL, f"forbidden calls beyond kopf's optional scanning: {denied - OPTIONAL}"
    assert secrets_read == {("tenant-a", "model-api-keys")}
