"""Every shipped manifest and example is accepted by a real kube-apiserver (server-side dry
run: schema, CEL rules, RBAC object validation, Pod Security), `kubectl get agenttasks`
shows the printer columns, and the Dockerfile passes hadolint."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from reactor import OPENCODE_VERSION
from reactor_dev.testing.shipped import EXAMPLES, MANIFESTS, ROOT, load_all
from reactor_dev.testing.tasks import ok

EXAMPLE_FILES = ["task.yaml", "parallel.yaml", "stacked.yaml", "secrets.yaml", "spendlimit.yaml", "monitoring/logs-reader-rbac.yaml"]


def dry_run(cluster, *args: str, input: str | None = None):
    return cluster.kubectl("apply", "--dry-run=server", *args, input=input)


# -- manifests/ ------------------------------------------------------------------------

def test_kustomization_passes_server_dry_run(reactor_system):
    out = dry_run(reactor_system, "-k", str(MANIFESTS))
    ok(out)
    for kind_name in ("customresourcedefinition.apiextensions.k8s.io/agenttasks.reactor.dev",
                      "customresourcedefinition.apiextensions.k8s.io/spendlimits.reactor.dev",
                      "service/reactor", "namespace/reactor-system",
                      "serviceaccount/reactor", "clusterrole.rbac.authorization.k8s.io/reactor-agenttasks",
                      "rolebinding.rbac.authorization.k8s.io/reactor-agenttasks",
                      "role.rbac.authorization.k8s.io/reactor-secrets", "persistentvolumeclaim/reactor-work",
                      "deployment.apps/reactor"):
        assert kind_name in out.stdout, out.stdout
    # The namespace warns on anything beyond the `restricted` Pod Security profile: the
    # Deployment's pod template raises no warning.
    assert "PodSecurity" not in out.stderr, out.stderr


def test_pod_security_check_is_live(reactor_system):
    """Control for the test above: the same Deployment without its seccomp profile and
    capability drop is flagged, so the absence of a warning means something."""
    deployment = load_all(MANIFESTS / "deployment.yaml")[0]
    deployment["metadata"]["name"] = "reactor-insecure"
    deployment["spec"]["template"]["spec"]["securityContext"].pop("seccompProfile")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"].pop("seccompProfile")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"].pop("capabilities")
    out = dry_run(reactor_system, "-f", "-", input=json.dumps(deployment))
    ok(out)
    assert "would violate PodSecurity" in out.stderr and "seccompProfile" in out.stderr, out.stderr


@pytest.mark.parametrize("name", sorted(p.name for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_each_manifest_passes_server_dry_run(reactor_system, name):
    ok(dry_run(reactor_system, "-f", str(MANIFESTS / name)))


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert "../crds" in listed
    assert {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"} <= listed


def test_deployment_is_hardened_and_sized():
    deployment = load_all(MANIFESTS / "deployment.yaml")[0]
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    assert pod["serviceAccountName"] == "reactor"
    assert pod["securityContext"]["runAsNonRoot"] is True
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    # Writable: the work dir (PVC), /tmp and HOME only.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts) == {"/var/lib/reactor", "/tmp", "/home/reactor"}
    assert volumes[mounts["/var/lib/reactor"]]["persistentVolumeClaim"]["claimName"] == "reactor-work"
    # Sized for the stated number of agents: ~330 MiB per idle opencode server (measured).
    max_agents = int(next(a for a in container["args"] if a.startswith("--max-agents=")).split("=")[1])
    mib = {"Mi": 1, "Gi": 1024}

    def to_mib(q: str) -> int:
        number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", q).groups()
        return int(number) * mib[unit]

    assert to_mib(container["resources"]["requests"]["memory"]) >= 256 + 330 * max_agents
    assert to_mib(container["resources"]["limits"]["memory"]) >= 256 + 640 * max_agents
    # Cell servers' ports do not collide with the liveness port.
    port_range = next(a for a in container["args"] if a.startswith("--port-range=")).split("=")[1]
    start, end = map(int, port_range.split("-"))
    assert not start <= 8080 < end


# -- examples/ -------------------------------------------------------------------------

@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_passes_server_dry_run(reactor_system, name):
    out = ok(dry_run(reactor_system, "-f", str(EXAMPLES / name)))
    assert out.count("(server dry run)") == len(load_all(EXAMPLES / name)), out


def test_examples_reference_the_example_secrets_and_rbac_lets_the_operator_read_them():
    secrets = {d["metadata"]["name"] for d in load_all(EXAMPLES / "secrets.yaml")}
    referenced = set()
    for name in ("task.yaml", "parallel.yaml"):
        for task in load_all(EXAMPLES / name):
            spec = task["spec"]
            referenced |= {e["secretRef"]["name"] for e in spec.get("agent", {}).get("envFrom", [])}
            referenced.add(spec["repository"]["credentialsSecretRef"]["name"])
    assert referenced == secrets
    for rbac in (MANIFESTS / "rbac.yaml", EXAMPLES / "tenant" / "rbac.yaml"):
        role = next(d for d in load_all(rbac) if d["kind"] == "Role" and d["metadata"]["name"] == "reactor-secrets")
        [rule] = role["rules"]
        assert (rule["apiGroups"], rule["resources"], rule["verbs"]) == ([""], ["secrets"], ["get"])
        assert set(rule["resourceNames"]) == secrets


def test_parallel_example_is_three_tasks_on_one_repository():
    tasks = load_all(EXAMPLES / "parallel.yaml")
    assert len(tasks) == 3 and len({t["metadata"]["name"] for t in tasks}) == 3
    assert len({t["spec"]["repository"]["url"] for t in tasks}) == 1


def test_tenant_rbac_passes_server_dry_run_in_a_tenant_namespace(reactor_system, namespace):
    out = ok(dry_run(reactor_system, "-n", namespace, "-f", str(EXAMPLES / "tenant" / "rbac.yaml")))
    assert out.count("(server dry run)") == 3, out


def test_gitops_task_folder_passes_server_dry_run(reactor_system):
    out = ok(dry_run(reactor_system, "-k", str(EXAMPLES / "gitops" / "tasks")))
    assert "agenttask.reactor.dev/fix-add" in out and "agenttask.reactor.dev/add-subtract" in out


# Argo CD and Flux are not installed on the test control plane. Their objects are checked
# against stand-in CRDs declaring the fields of the real schemas these examples use (with
# the real required fields, types and enums); the rest is left open.
OPEN = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
STR = {"type": "string"}
STANDIN_CRDS = {
    ("argoproj.io", "applications", "Application", "v1alpha1"): {
        "type": "object", "required": ["spec"], "properties": {"spec": {
            "type": "object", "required": ["destination", "project"], "x-kubernetes-preserve-unknown-fields": True,
            "properties": {
                "project": STR,
                "destination": {"type": "object", "properties": {"server": STR, "namespace": STR, "name": STR}},
                "source": {"type": "object", "required": ["repoURL"], "x-kubernetes-preserve-unknown-fields": True,
                           "properties": {"repoURL": STR, "path": STR, "targetRevision": STR}},
                "ignoreDifferences": {"type": "array", "items": {
                    "type": "object", "required": ["kind"], "properties": {
                        "group": STR, "kind": STR, "name": STR, "namespace": STR,
                        "jsonPointers": {"type": "array", "items": STR},
                        "jqPathExpressions": {"type": "array", "items": STR},
                        "managedFieldsManagers": {"type": "array", "items": STR}}}},
                "syncPolicy": {"type": "object", "properties": {
                    "automated": {"type": "object", "properties": {
                        "prune": {"type": "boolean"}, "selfHeal": {"type": "boolean"}}},
                    "syncOptions": {"type": "array", "items": STR}}},
            }}}},
    ("source.toolkit.fluxcd.io", "gitrepositories", "GitRepository", "v1"): {
        "type": "object", "properties": {"spec": {
            "type": "object", "required": ["interval", "url"], "x-kubernetes-preserve-unknown-fields": True,
            "properties": {"interval": {"type": "string", "pattern": "^([0-9]+(\\.[0-9]+)?(ms|s|m|h))+$"},
                           "url": {"type": "string", "pattern": "^(http|https|ssh)://.*$"},
                           "ref": {"type": "object", "properties": {"branch": STR, "tag": STR}}}}}},
    ("kustomize.toolkit.fluxcd.io", "kustomizations", "Kustomization", "v1"): {
        "type": "object", "properties": {"spec": {
            "type": "object", "required": ["interval", "prune", "sourceRef"], "x-kubernetes-preserve-unknown-fields": True,
            "properties": {
                "interval": {"type": "string", "pattern": "^([0-9]+(\\.[0-9]+)?(ms|s|m|h))+$"},
                "timeout": {"type": "string", "pattern": "^([0-9]+(\\.[0-9]+)?(ms|s|m|h))+$"},
                "path": STR, "targetNamespace": STR,
                "prune": {"type": "boolean"}, "force": {"type": "boolean"}, "wait": {"type": "boolean"},
                "sourceRef": {"type": "object", "required": ["kind", "name"], "properties": {
                    "kind": {"type": "string", "enum": ["OCIRepository", "GitRepository", "Bucket", "ExternalArtifact"]},
                    "name": STR, "namespace": STR}}}}}},
    # prometheus-operator's, reduced to what examples/monitoring/servicemonitor.yaml uses.
    ("monitoring.coreos.com", "servicemonitors", "ServiceMonitor", "v1"): {
        "type": "object", "properties": {"spec": {
            "type": "object", "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "namespaceSelector": {"type": "object", "properties": {"matchNames": {"type": "array", "items": STR}}},
                "endpoints": {"type": "array", "items": {"type": "object", "properties": {
                    "port": STR, "path": STR, "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"}}}}}}}},
}


@pytest.fixture(scope="module")
def gitops_standins(reactor_system):
    for (group, plural, kind, version), schema in STANDIN_CRDS.items():
        crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
               "metadata": {"name": f"{plural}.{group}"},
               "spec": {"group": group, "scope": "Namespaced",
                        "names": {"plural": plural, "kind": kind, "singular": kind.lower()},
                        "versions": [{"name": version, "served": True, "storage": True,
                                      "schema": {"openAPIV3Schema": schema}}]}}
        ok(reactor_system.kubectl("apply", "-f", "-", input=json.dumps(crd)))
        ok(reactor_system.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{plural}.{group}"))
    for ns in ("argocd", "flux-system"):
        reactor_system.kubectl("create", "namespace", ns)
    return reactor_system


@pytest.mark.parametrize("path", ["gitops/argocd/application.yaml", "gitops/flux/kustomization.yaml",
                                  "monitoring/servicemonitor.yaml"])
def test_tool_objects_pass_server_dry_run_against_standin_crds(gitops_standins, path):
    out = ok(dry_run(gitops_standins, "-f", str(EXAMPLES / path)))
    assert out.count("(server dry run)") == len(load_all(EXAMPLES / path)), out


def test_servicemonitor_selects_the_operator_service_port():
    [monitor] = load_all(EXAMPLES / "monitoring" / "servicemonitor.yaml")
    [service] = load_all(MANIFESTS / "service.yaml")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in [p["name"] for p in service["spec"]["ports"]]
    deployment = load_all(MANIFESTS / "deployment.yaml")[0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--web=0.0.0.0:8081" in container["args"]
    assert {"name": "web", "containerPort": 8081, "protocol": "TCP"} in container["ports"]


def test_gitops_paths_point_at_the_task_folder():
    app = load_all(EXAMPLES / "gitops" / "argocd" / "application.yaml")[0]
    flux = [d for d in load_all(EXAMPLES / "gitops" / "flux" / "kustomization.yaml") if d["kind"] == "Kustomization"][0]
    assert (ROOT / app["spec"]["source"]["path"] / "kustomization.yaml").is_file()
    assert (ROOT / flux["spec"]["path"] / "kustomization.yaml").is_file()
    assert flux["spec"]["force"] is False  # force would re-create (re-run) an edited task


def test_argocd_ignore_differences_cover_what_the_operator_writes():
    """The jq expression selects exactly the reactor.dev/* annotations (checked with jq,
    whose path semantics Argo CD's gojq shares)."""
    app = load_all(EXAMPLES / "gitops" / "argocd" / "application.yaml")[0]
    ignore = app["spec"]["ignoreDifferences"][0]
    assert {"/status", "/metadata/finalizers"} <= set(ignore["jsonPointers"])
    expression = ignore["jqPathExpressions"][0]
    live = {"metadata": {"annotations": {"reactor.dev/last-handled-configuration": "{}", "reactor.dev/created": "{}",
                                         "kubectl.kubernetes.io/last-applied-configuration": "{}"}}}
    for obj, expected in ((live, [["metadata", "annotations", "reactor.dev/created"],
                                  ["metadata", "annotations", "reactor.dev/last-handled-configuration"]]),
                          ({"metadata": {}}, [])):
        out = subprocess.run(["jq", "-c", f"[path({expression})]"], input=json.dumps(obj), capture_output=True,
                             text=True, check=True)
        assert sorted(json.loads(out.stdout)) == expected


def test_kind_config_is_a_kind_cluster():
    """kind's config is not a Kubernetes object (kind reads it, not the API server): checked here."""
    config = load_all(EXAMPLES / "kind" / "kind-config.yaml")[0]
    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4" and config["kind"] == "Cluster"
    assert config["name"] == "reactor" and [n["role"] for n in config["nodes"]] == ["control-plane"]
    readme = (EXAMPLES / "kind" / "README.md").read_text()
    assert "kind load docker-image reactor:0.1.0 --name reactor" in readme


# -- printer columns -------------------------------------------------------------------

def test_get_agenttasks_shows_the_printer_columns(crd_installed, namespace):
    task = load_all(EXAMPLES / "task.yaml")[0]
    task["metadata"]["namespace"] = namespace
    ok(crd_installed.kubectl("apply", "-f", "-", input=json.dumps(task)))
    status = {"status": {
        "phase": "Succeeded",
        "result": {"outcome": "committed", "commit": "0123456789abcdef", "shortCommit": "0123456"},
        "usage": {"cost": 0.0123, "costDisplay": "$0.0123"},
        "progress": {"cost": 0.0123, "costDisplay": "$0.0123", "activity": "idle", "totalTokens": 4100},
        "cell": {"port": 20001},
        "conditions": [{"type": "Succeeded", "status": "True", "reason": "Committed"}],
    }}
    ok(crd_installed.kubectl("patch", "-n", namespace, "agenttask", "fix-add", "--subresource=status",
                             "--type=merge", "-p", json.dumps(status)))

    table = ok(crd_installed.kubectl("get", "-n", namespace, "agenttasks")).splitlines()
    assert table[0].split() == ["NAME", "PHASE", "RESULT", "COMMIT", "COST", "WAITING-ON", "AGE"]
    assert table[1].split()[:5] == ["fix-add", "Succeeded", "committed", "0123456", "$0.0123"]

    wide = ok(crd_installed.kubectl("get", "-n", namespace, "agenttasks", "-o", "wide")).splitlines()
    assert wide[0].split() == ["NAME", "PHASE", "RESULT", "COMMIT", "COST", "WAITING-ON", "AGE", "ACTIVITY", "TOKENS", "PORT",
                               "REASON", "REPLICA", "CLAIMED", "PR", "DEPENDS-ON"]
    row = wide[1].split()
    assert row[:5] == ["fix-add", "Succeeded", "committed", "0123456", "$0.0123"]
    assert row[-4:] == ["idle", "4100", "20001", "Committed"]
    # Short name and category work too.
    assert "fix-add" in ok(crd_installed.kubectl("get", "-n", namespace, "at"))
    assert "fix-add" in ok(crd_installed.kubectl("get", "-n", namespace, "reactor"))


# -- Dockerfile --------------------------------------------------------------------------

def hadolint() -> Path:
    return Path(__import__("sys").executable).parent / "hadolint"


def test_dockerfile_passes_hadolint():
    out = subprocess.run([str(hadolint()), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_does_flag_a_bad_dockerfile():
    """Control: the lint really runs (a clean result is not an absent linter)."""
    bad = "FROM python:latest\nRUN apt-get install git\n"
    out = subprocess.run([str(hadolint()), "--no-color", "-"], input=bad, capture_output=True, text=True)
    assert out.returncode != 0 and "DL3007" in out.stdout


def test_dockerfile_pins_the_opencode_version_of_the_package():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG OPENCODE_VERSION=(\S+)$", text, re.M).group(1) == OPENCODE_VERSION
    assert "FROM python:3.11-slim" in text and re.search(r"^USER 10001", text, re.M)


def test_dockerignore_keeps_the_context_small():
    lines = (ROOT / ".dockerignore").read_text().split()
    assert lines[lines.index("*")] == "*" and {"!pyproject.toml", "!README.md", "!operator/"} <= set(lines)
