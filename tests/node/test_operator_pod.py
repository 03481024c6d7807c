"""The operator as users run it: `kubectl apply -k manifests/` exactly as shipped, on a real
node (containerd + runc, kubelet, kube-proxy), its image built from the Dockerfile, its
ServiceAccount token, Pod Security `restricted`. Only the model is scripted; it listens
inside the node's network namespace, where the pod reaches it.

One node and one deployment for the whole module; the tests run in file order (the last
one undeploys)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from reactor_dev.devcluster.node import NodeCluster
from reactor.infra.mirrors import RepositoryMirrors
from reactor.infra.worktrees import repository_key
from reactor_dev.testing.attacks import REPORT, Targets, attack_step
from reactor_dev.testing.repos import make_repo
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, edit, hang, set_event, text, write
from reactor_dev.testing.scripted_model import wait_for as wait_for_event
from tests.security.test_confinement import assert_every_attempt_blocked
from tests.node.conftest import (
    NAMESPACE,
    POD_MOUNT,
    ROOT,
    chown_tree,
    get_json,
    host_path,
    kubectl_ok,
)

SA_USER = f"system:serviceaccount:{NAMESPACE}:reactor"
SA_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # the operator's credential, in its pod
VICTIM_KEY = "sk-victim-only-9a8b7c6d"
# The operator's PID inside its pod (tini is PID 1; the Python process under it).
FIND_OPERATOR_PID = ("import pathlib; print(next(p.name for p in pathlib.Path('/proc').iterdir() if p.name.isdigit() "
                     "and b'operator' in (p / 'cmdline').read_bytes() and b'python' in (p / 'cmdline').read_bytes()))")
FIX = edit("calc.py", "return a - b", "return a + b")
TEST_COMMAND = "python3 -c 'from calc import add; assert add(2, 3) == 5'"  # the image has no pytest
SELECTOR = "app.kubernetes.io/name=reactor,app.kubernetes.io/component=operator"


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(node_cluster: NodeCluster):
    """The scripted model on the node's address, inside its namespace: pods reach it, and
    nothing outside this machine can."""
    server = ScriptedModel(host=node_cluster.node_ip)
    node_cluster.run_in_netns(server.start)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def deployed(node_cluster: NodeCluster):
    """`kubectl apply -k manifests/` as shipped, then the Deployment available."""
    started = time.monotonic()
    kubectl_ok(node_cluster, "apply", "-k", str(ROOT / "manifests"))
    kubectl_ok(node_cluster, "rollout", "status", "-n", NAMESPACE, "deployment/reactor", "--timeout=180s",
               timeout=200)
    print(f"\napply -k manifests/ -> Deployment available: {time.monotonic() - started:.1f}s")
    return node_cluster


@pytest.fixture(scope="module")
def volume(deployed: NodeCluster) -> Path:
    """The operator's PersistentVolume as a directory on this host."""
    claim = get_json(deployed, "pvc", "-n", NAMESPACE, "reactor-work")
    assert claim["status"]["phase"] == "Bound"
    pv = get_json(deployed, "pv", claim["spec"]["volumeName"])
    return Path(pv["spec"]["local"]["path"])


@pytest.fixture(scope="module")
def repo_url(volume: Path, tmp_path_factory) -> tuple[str, Path]:
    """A bare repository on the operator's volume (file:// inside the pod: the pod's network
    reaches no git host), owned by the operator's user."""
    source = make_repo(tmp_path_factory.mktemp("source") / "app")
    subprocess.run(["git", "-C", str(source), "branch", "reactor/OLD"], check=True)  # another task's result
    bare = volume / "repos" / "app.git"
    bare.parent.mkdir(exist_ok=True)
    subprocess.run(["git", "clone", "--quiet", "--bare", str(source), str(bare)], check=True)
    chown_tree(volume / "repos")
    return f"file://{POD_MOUNT / 'repos' / 'app.git'}", bare


def rev_parse(bare: Path, ref: str) -> str:
    """A ref of a repository the operator's user owns (git refuses other owners' by default)."""
    return subprocess.run(["git", "-c", "safe.directory=*", "-C", str(bare), "rev-parse", ref],
                          capture_output=True, text=True, check=True).stdout.strip()


def fingerprint(git_dir: Path, ignore_refs: tuple[str, ...] = ()) -> dict[str, str]:
    """What an attack on a repository would change: hooks, config, refs."""
    refs = subprocess.run(["git", "-c", "safe.directory=*", "--git-dir", str(git_dir), "for-each-ref",
                           "--format=%(refname) %(objectname)"], capture_output=True, text=True, check=True).stdout
    return {"hooks": ",".join(sorted(p.name for p in (git_dir / "hooks").iterdir())),
            "config": hashlib.sha256((git_dir / "config").read_bytes()).hexdigest(),
            "refs": "\n".join(line for line in refs.splitlines() if line.split()[0] not in ignore_refs)}


def task(name: str, url: str, model: ScriptedModel, **spec) -> dict:
    body = {
        "description": "Fix add",
        "prompt": f"{name}: fix add() in calc.py so the tests pass",
        "repository": {"url": url, "branch": "main"},
        "test": {"command": TEST_COMMAND, "timeout": "2m"},
        "agent": {"config": model.opencode_config()},
        "timeout": "5m",
    }
    body.update(spec)
    return {"apiVersion": "reactor.dev/v1alpha1", "kind": "AgentTask",
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": body}


def apply(cluster: NodeCluster, obj: dict) -> None:
    kubectl_ok(cluster, "apply", "-f", "-", input=json.dumps(obj))


def get_task(cluster: NodeCluster, name: str) -> dict | None:
    out = cluster.kubectl("get", "-n", NAMESPACE, "agenttask", name, "-o", "json")
    return json.loads(out.stdout) if out.returncode == 0 else None


def wait_for(cluster: NodeCluster, name: str, predicate, what: str, timeout: float = 240) -> dict | None:
    deadline = time.monotonic() + timeout
    while True:
        obj = get_task(cluster, name)
        if predicate(obj):
            return obj
        if time.monotonic() > deadline:
            logs = cluster.kubectl("logs", "-n", NAMESPACE, "-l", SELECTOR, "--tail=60").stdout
            raise AssertionError(f"{name}: {what} not reached in {timeout}s; status: "
                                 f"{json.dumps((obj or {}).get('status'), indent=1)}\noperator log:\n{logs}")
        time.sleep(0.2)


def terminal(obj: dict | None) -> bool:
    return bool(obj) and (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def condition(obj: dict, type_: str) -> dict:
    return next(c for c in obj["status"]["conditions"] if c["type"] == type_)


def reason(obj: dict) -> str:
    return condition(obj, "Succeeded")["reason"]


def operator_pod(cluster: NodeCluster) -> dict:
    pods = [p for p in get_json(cluster, "pods", "-n", NAMESPACE, "-l", SELECTOR)["items"]
            if not p["metadata"].get("deletionTimestamp")]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return pods[0]


def probe_successes(cluster: NodeCluster, pod: str) -> int:
    """The kubelet's own count of successful liveness probes of the pod."""
    metrics = cluster.kubelet_get("/metrics/probes").text
    pattern = re.compile(r'^prober_probe_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$', re.M)
    return sum(int(float(m["value"])) for m in pattern.finditer(metrics)
               if f'pod="{pod}"' in m["labels"] and 'probe_type="Liveness"' in m["labels"]
               and 'result="successful"' in m["labels"])


# --- tests ---------------------------------------------------------------------------------


def test_shipped_manifests_run_the_operator_restricted_and_live(deployed):
    cluster = deployed
    pod = operator_pod(cluster)
    shipped = yaml.safe_load((ROOT / "manifests" / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    # The Deployment's securityContext reached the pod unchanged, and the namespace enforces
    # `restricted` (a pod that breaks it is refused there).
    assert pod["spec"]["securityContext"] == shipped["securityContext"]
    assert pod["spec"]["containers"][0]["securityContext"] == shipped["containers"][0]["securityContext"]
    assert pod["spec"]["serviceAccountName"] == "reactor"
    labels = get_json(cluster, "namespace", NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    rogue = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "rogue", "namespace": NAMESPACE},
             "spec": {"containers": [{"name": "c", "image": "docker.io/library/reactor:0.1.0"}]}}
    refused = cluster.kubectl("apply", "-f", "-", input=json.dumps(rogue))
    assert refused.returncode != 0 and "violates PodSecurity" in refused.stderr, refused.stderr
    # Running as the image's non-root user with nothing extra.
    status = cluster.kubectl("exec", "-n", NAMESPACE, pod["metadata"]["name"], "--", "sh", "-c",
                             "id -u; grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/1/status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.split()[0] == "10001"
    assert "CapEff:\t0000000000000000" in status.stdout and "NoNewPrivs:\t1" in status.stdout
    assert "Seccomp:\t2" in status.stdout  # filter mode: RuntimeDefault
    # The image holds the code under test (a stale build layer would not).
    sources = ("workflow/tcr.py", "infra/servers.py", "kube/supervisor.py", "opencode/run_with_status.sh")
    installed = cluster.kubectl("exec", "-n", NAMESPACE, pod["metadata"]["name"], "--", "python", "-c",
                                "import hashlib, pathlib, reactor; root = pathlib.Path(reactor.__file__).parent; "
                                f"print(' '.join(hashlib.sha256((root / f).read_bytes()).hexdigest() for f in {sources!r}))")
    assert installed.returncode == 0, installed.stderr
    assert installed.stdout.split() == [hashlib.sha256((ROOT / "operator/reactor" / f).read_bytes()).hexdigest()
                                        for f in sources], "the image is stale: rebuild it (make image)"
    # The kubelet's liveness probe (first after 15 s) has passed, and never failed.
    name = pod["metadata"]["name"]
    deadline = time.monotonic() + 90
    while probe_successes(cluster, name) < 1:
        assert time.monotonic() < deadline, "no successful liveness probe in 90 s"
        time.sleep(1)
    pod = operator_pod(cluster)
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0


def test_a_task_succeeds_run_by_the_pod_with_its_service_account(deployed, model, repo_url):
    cluster, (url, bare) = deployed, repo_url
    model.script.add(Scenario("fix-in-pod:", [FIX, text("Fixed.")]))
    started = time.monotonic()
    apply(cluster, task("fix-in-pod", url, model))
    obj = wait_for(cluster, "fix-in-pod", terminal, "a terminal phase")
    print(f"\napply -> Succeeded in the pod: {time.monotonic() - started:.1f}s")
    status = obj["status"]
    assert status["phase"] == "Succeeded", status
    assert status["result"]["pushed"] is True
    assert status["result"]["commit"] == rev_parse(bare, "reactor/fix-in-pod")
    assert any(r.get("scenario") == "fix-in-pod:" for r in model.requests), "the pod's cell reached the model"
    # Every write to the task came from the operator's ServiceAccount token, none from an admin.
    writers = {e["user"]["username"] for e in cluster.audit_events()
               if (e.get("objectRef") or {}).get("name") == "fix-in-pod"
               and e["objectRef"].get("resource") == "agenttasks" and e["verb"] in ("patch", "update")}
    assert writers == {SA_USER}, writers
    events = [e for e in get_json(cluster, "events", "-n", NAMESPACE)["items"]
              if e["involvedObject"]["name"] == "fix-in-pod"]
    assert {"Bootstrapping", "Executing", "Testing", "Committing", "Succeeded"} <= {e["reason"] for e in events}
    posted_by = {e["user"]["username"] for e in cluster.audit_events()
                 if (e.get("objectRef") or {}).get("resource") == "events" and e["verb"] == "create"
                 and (e.get("objectRef") or {}).get("namespace") == NAMESPACE}
    assert SA_USER in posted_by
    logs = kubectl_ok(cluster, "logs", "-n", NAMESPACE, "deployment/reactor")
    for phase in ("Bootstrapping", "Executing", "Testing", "Committing", "Succeeded"):
        assert re.search(rf"fix-in-pod.*{phase}|{phase}.*fix-in-pod", logs), f"no {phase} line in the pod's log"


def test_confinement_holds_in_the_pod(deployed, model, repo_url, volume):
    """A hostile task beside a victim that holds a model key from its own Secret, inside the
    operator pod (seccomp RuntimeDefault, no capabilities, read-only root): every attempt on
    the neighbour, the shared mirror, the operator and its ServiceAccount token is blocked."""
    cluster, (url, bare) = deployed, repo_url
    origin_before = fingerprint(bare)
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "model-api-keys", "namespace": NAMESPACE},
              "stringData": {"VICTIM_API_KEY": VICTIM_KEY}}  # a name manifests/rbac.yaml lets the operator read
    apply(cluster, secret)
    up, attacked = threading.Event(), threading.Event()
    model.script.add(Scenario("victim:", [set_event(up), wait_for_event(attacked), FIX,
                                          write("victim.py", "VICTIM = 1\n"), text("Fixed.")]))
    apply(cluster, task("victim", url, model, resultBranch="reactor/victim",
                        agent={"config": model.opencode_config(), "envFrom": [{"secretRef": {"name": "model-api-keys"}}]}))
    uid = get_task(cluster, "victim")["metadata"]["uid"]
    mirror = RepositoryMirrors(POD_MOUNT / "work" / "mirrors").path_for(url)
    pod = operator_pod(cluster)["metadata"]["name"]
    operator_pid = int(kubectl_ok(cluster, "exec", "-n", NAMESPACE, pod, "--", "python", "-c", FIND_OPERATOR_PID))
    targets = Targets(
        outside_file=str(POD_MOUNT / "outside.txt"),  # the operator's own volume: writable but for Landlock
        other_checkout_file=str(POD_MOUNT / "work" / "worktrees" / repository_key(mirror) /
                                f"{NAMESPACE}.victim.{uid[:8]}" / "calc.py"),
        source_git_dir=str(mirror),
        other_branch="refs/heads/reactor/OLD",
        protected_files=[SA_TOKEN],
        operator_pid=operator_pid,
        secret=VICTIM_KEY,
    )
    model.script.add(Scenario("attacker:", [wait_for_event(up), attack_step(targets), set_event(attacked), FIX,
                                            text("Fixed.")]))
    apply(cluster, task("attacker", url, model, resultBranch="reactor/attacker"))
    attacker = wait_for(cluster, "attacker", terminal, "a terminal phase", timeout=300)
    victim = wait_for(cluster, "victim", terminal, "a terminal phase", timeout=300)

    assert attacker["status"]["phase"] == "Succeeded", attacker["status"]
    assert condition(attacker, "Confined")["status"] == "True"
    report = subprocess.run(["git", "-c", "safe.directory=*", "--git-dir", str(bare), "show",
                             f"reactor/attacker:{REPORT}"], capture_output=True, text=True, check=True).stdout
    assert_every_attempt_blocked(report, protected=[Path(SA_TOKEN).name])
    assert victim["status"]["phase"] == "Succeeded", victim["status"]
    after = fingerprint(bare, ("refs/heads/reactor/attacker", "refs/heads/reactor/victim"))
    assert after["hooks"] == origin_before["hooks"] and after["config"] == origin_before["config"]
    assert after["refs"] == origin_before["refs"], "no ref of the repository moved but the two results"
    shared = host_path(volume, str(mirror))
    assert "post-checkout" not in fingerprint(shared)["hooks"] and "fsmonitor" not in (shared / "config").read_text()
    assert not (volume / "outside.txt").exists()
    assert operator_pod(cluster)["status"]["containerStatuses"][0]["restartCount"] == 0, "the operator lives"


def test_a_cell_out_of_memory_fails_its_task_and_spares_the_rest(deployed, model, repo_url, volume):
    """The hog's test command allocates past the pod's 3Gi limit. The kernel must pick it
    (cells raise their oom_score_adj), not the operator or another cell."""
    cluster, (url, _) = deployed, repo_url
    pod_before = operator_pod(cluster)
    # The bystander waits in its test run for a file only this test creates: it is alive
    # and mid-test while the hog runs.
    model.script.add(Scenario("bystander:", [FIX, text("Fixed.")]))
    apply(cluster, task("bystander", url, model, resultBranch="reactor/bystander", test={
        "command": f"while [ ! -e .release ]; do sleep 0.1; done; {TEST_COMMAND}", "timeout": "4m"}))
    bystander = wait_for(cluster, "bystander", lambda o: o and o.get("status", {}).get("phase") == "Testing",
                         "Testing")
    bystander_server = bystander["status"]["cell"]["serverPid"]

    model.script.add(Scenario("hog:", [write("notes.txt", "x\n"), text("Done.")]))
    hog_command = "python3 -c 'chunks = [bytearray(64 << 20) for _ in range(64)]; print(len(chunks))'"
    apply(cluster, task("hog", url, model, resultBranch="reactor/hog", test={"command": hog_command}))
    hog = wait_for(cluster, "hog", terminal, "a terminal phase")
    assert hog["status"]["phase"] == "Failed"
    assert reason(hog) == "OutOfMemory", hog["status"]
    assert "out-of-memory" in hog["status"]["message"]
    assert hog["status"]["result"]["testExitCode"] == 137

    # The operator lived through it: same pod, never restarted, still answering.
    pod_after = operator_pod(cluster)
    assert pod_after["metadata"]["uid"] == pod_before["metadata"]["uid"]
    assert pod_after["status"]["containerStatuses"][0]["restartCount"] == 0
    # ... and so did the other cell, which now finishes its run.
    still = get_task(cluster, "bystander")
    assert still["status"]["phase"] == "Testing" and still["status"]["cell"]["serverPid"] == bystander_server
    release = host_path(volume, still["status"]["cell"]["worktree"]) / ".release"
    release.touch()
    done = wait_for(cluster, "bystander", terminal, "a terminal phase")
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert done["status"]["attempts"] == 1


def test_deleting_the_operator_pod_mid_task_the_new_pod_finishes_it(deployed, model, repo_url, volume):
    cluster, (url, bare) = deployed, repo_url
    model.script.add(Scenario("survivor:", [hang(times=1), FIX, text("Fixed.")]))
    apply(cluster, task("survivor", url, model, resultBranch="reactor/survivor"))
    wait_for(cluster, "survivor", lambda o: o and o.get("status", {}).get("phase") == "Executing"
             and any(r.get("scenario") == "survivor:" and r["kind"] == "hang" for r in model.requests),
             "the agent mid-turn")
    old = operator_pod(cluster)["metadata"]
    kubectl_ok(cluster, "delete", "pod", "-n", NAMESPACE, old["name"], "--wait=false")

    obj = wait_for(cluster, "survivor", terminal, "a terminal phase")
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    assert obj["status"]["result"]["commit"] == rev_parse(bare, "reactor/survivor")
    new = operator_pod(cluster)["metadata"]
    assert new["uid"] != old["uid"], "the Deployment's new pod finished it"
    # The new pod found the task where the old one left it: on the API server and the volume.
    worktrees = volume / "work" / "worktrees"
    assert not worktrees.exists() or not any(p.name.startswith(f"{NAMESPACE}.survivor")
                                             for p in worktrees.rglob("*")), "no worktree left behind"
    deleted = time.monotonic()
    kubectl_ok(cluster, "delete", "-n", NAMESPACE, "agenttask", "survivor", "--timeout=30s")
    assert get_task(cluster, "survivor") is None
    print(f"\ndelete -> gone (finalizer released): {time.monotonic() - deleted:.2f}s")


def test_make_undeploy_removes_everything_tasks_first(deployed, model, repo_url):
    cluster, (url, _) = deployed, repo_url
    # A task mid-run: its finalizer must go while the operator still runs.
    model.script.add(Scenario("last:", [hang(times=1), FIX, text("Fixed.")]))
    apply(cluster, task("last", url, model, resultBranch="reactor/last"))
    wait_for(cluster, "last", lambda o: o and o.get("status", {}).get("phase") == "Executing", "Executing")
    kubectl = Path(cluster.assets.kubectl)
    out = subprocess.run(["make", "--no-print-directory", "undeploy"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "KUBECONFIG": str(cluster.kubeconfig_path),
                                           "PATH": f"{kubectl.parent}:{__import__('os').environ['PATH']}"})
    assert out.returncode == 0, out.stderr + out.stdout
    lines = out.stdout.splitlines()
    first_task = next(i for i, line in enumerate(lines) if "agenttask" in line and "deleted" in line)
    first_other = next(i for i, line in enumerate(lines) if "deleted" in line and "agenttask" not in line)
    assert first_task < first_other, "tasks are deleted before the operator"
    assert cluster.kubectl("get", "namespace", NAMESPACE).returncode != 0
    assert cluster.kubectl("get", "crd", "agenttasks.reactor.dev").returncode != 0
    for kind in ("clusterrole", "clusterrolebinding"):
        names = kubectl_ok(cluster, "get", kind, "-l", "app.kubernetes.io/name=reactor", "-o", "name")
        assert names.strip() == "", names
