"""The operator's merge queue lands tasks' results through their pull requests: a real
kube-apiserver, `reactor operator` as a real process, real opencode, a real Gitea, the
scripted model. Two tasks (spec.result pullRequest, spec.integrate queue) change the same line
from the same base; each opens its PR. The queue tests the first candidate and merges its PR
fast-forward with the candidate as its guarded head. The second then conflicts textually: a
rebase round resolves it on the new tip, replaces the result on the task's own branch, and
the same PR follows the new commit and is merged the same way. The base on the forge only
ever holds tested commits."""

from __future__ import annotations

import base64
import json
import subprocess
from urllib.parse import urlsplit

import pytest

from reactor_dev.testing.operator_process import operators
from reactor_dev.testing.repos import git, make_repo
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, bash, text, write
from reactor_dev.testing.tasks import kubectl_apply

pytestmark = [pytest.mark.opencode, pytest.mark.kube]

SHARED = "VALUE = 1\n"
TEST_SHARED = "import shared\n\n\ndef test_value():\n    assert isinstance(shared.VALUE, int)\n"
# The rebase round's agent: resolves only a checkout that holds the conflict (else it changes
# nothing and the markers fail the tests), keeping both sides' intent.
RESOLVE = bash("grep -q '^<<<<<<<' shared.py && printf 'VALUE = 2 + 3\\n' > shared.py")


def secret(cluster, namespace: str, name: str, data: dict[str, str]) -> None:
    manifest = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
                "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}
    out = cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    assert out.returncode == 0, out.stderr


def status(obj: dict | None) -> dict:
    return (obj or {}).get("status") or {}


def test_queued_results_are_merged_through_their_pull_requests_and_a_rebased_one_keeps_its_pull_request(
        crd_installed, namespace, work_dir, gitea, tmp_path):
    repo = f"queue-{namespace[-8:]}"
    url = gitea.create_repository(repo, make_repo(tmp_path / "app", {"shared.py": SHARED, "test_shared.py": TEST_SHARED}))
    secret(crd_installed, namespace, "git-creds", {"username": "reactor", "password": gitea.password})
    secret(crd_installed, namespace, "forge-token", {"token": gitea.token})
    flags = ("--forge-token-secret", "forge-token", "--forge-host", urlsplit(url).netloc, "--pr-check-interval", "1s")
    repository = {"url": url, "branch": "main", "credentialsSecretRef": {"name": "git-creds"}}
    scenarios = [Scenario("no longer applies", [RESOLVE, text("Resolved the conflict.")]),
                 Scenario("alpha:", [write("shared.py", "VALUE = 2\n"), text("Done.")]),
                 Scenario("beta:", [write("shared.py", "VALUE = 3\n"), text("Done.")])]
    with operators(crd_installed, namespace, work_dir) as start, ScriptedModel(scenarios) as model:
        op = start(*flags)
        first_pass = {}
        # Both results are made on the same base, their PRs open, before the queue exists.
        for name in ("alpha", "beta"):
            assert kubectl_apply(op.cluster, namespace, {
                "apiVersion": "reactor.dev/v1alpha1", "kind": "AgentTask", "metadata": {"name": name},
                "spec": {"description": f"Change VALUE ({name})", "prompt": f"{name}: change VALUE in shared.py",
                         "repository": repository, "test": {"command": "python3 -m pytest -q -p no:cacheprovider"},
                         "agent": {"config": model.opencode_config()}, "timeout": "3m", "integrate": "queue",
                         "result": {"kind": "pullRequest", "forge": "gitea"}}}).returncode == 0
            obj = op.wait_for(name, lambda o: (status(o).get("pullRequest") or {}).get("state") == "open"
                              and status(o)["pullRequest"].get("headCommit") == (status(o).get("result") or {}).get("commit"),
                              timeout=180, what="succeeded, its pull request open at its result")
            first_pass[name] = obj["status"]
        assert kubectl_apply(op.cluster, namespace, {
            "apiVersion": "reactor.dev/v1alpha1", "kind": "MergeQueue", "metadata": {"name": "main"},
            "spec": {"repository": repository, "maxBatch": 2}}).returncode == 0

        def landed(o: dict | None) -> bool:
            return (status(o).get("integration") or {}).get("state") in ("Integrated", "Ejected") \
                and (status(o).get("pullRequest") or {}).get("state") in ("merged", "closed")

        beta = op.wait_for("beta", landed, timeout=300, what="integrated on the second pass, its PR merged")
        alpha = op.wait_for("alpha", landed, timeout=60, what="integrated, its PR merged")

    alpha_status, beta_status = alpha["status"], beta["status"]
    assert alpha_status["integration"]["state"] == "Integrated" and not alpha_status.get("rebases")
    assert (beta_status["integration"]["state"], beta_status["rebases"]) == ("Integrated", 1), \
        json.dumps(beta_status, indent=1)
    # Still two PRs, both merged: the rebase round moved beta's own branch, and its PR with it.
    pulls = {p["head"]["ref"]: p for p in gitea.pull_requests(repo)}
    assert sorted(pulls) == ["reactor/alpha", "reactor/beta"] and all(p["merged"] for p in pulls.values()), pulls
    beta_pull = pulls["reactor/beta"]
    assert beta_pull["number"] == first_pass["beta"]["pullRequest"]["number"] == beta_status["pullRequest"]["number"]
    # The rebase round's result replaced the first on beta's branch, made on the tip alpha's
    # merge left; the publisher moved the same PR to it.
    new_commit = beta_status["result"]["commit"]
    assert new_commit != first_pass["beta"]["result"]["commit"]
    assert beta_status["pullRequest"]["headCommit"] == new_commit == beta_status["integration"]["commit"]
    assert beta_status["result"]["startCommit"] == alpha_status["integration"]["baseCommit"]
    # Each PR was merged fast-forward at the candidate the queue tested (the result on the
    # tip, pushed as the PR's head): that is the forge's base now.
    assert pulls["reactor/alpha"]["head"]["sha"] == alpha_status["integration"]["baseCommit"]
    main = gitea.api("GET", f"/repos/reactor/{repo}/branches/main").json()["commit"]["id"]
    assert beta_pull["head"]["sha"] == main == beta_status["integration"]["baseCommit"]
    # Every commit the forge's base holds passes the tests.
    checkout = tmp_path / "check"
    subprocess.run(["git", "clone", "--quiet", url, str(checkout)], check=True, env=gitea.git_env())
    assert git(checkout, "show", "main:shared.py") == "VALUE = 2 + 3"
    for commit in git(checkout, "rev-list", "main").split():
        git(checkout, "checkout", "--quiet", "--detach", commit)
        assert subprocess.run(["python3", "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=checkout,
                              capture_output=True).returncode == 0, commit
