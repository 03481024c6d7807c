"""The operator's merge queue lands a task's result through its pull request: a real
kube-apiserver, `reactor operator` as a real process, real opencode, a real Gitea, the
scripted model. The task (spec.result pullRequest, spec.integrate queue) succeeds, its PR is
opened, the queue waits for it, tests the candidate and merges the PR fast-forward with the
candidate as its guarded head: the base on the forge is the tested commit, the PR reads
merged there and in the task's status."""

from __future__ import annotations

import base64
import json
from urllib.parse import urlsplit

import pytest

from reactor_dev.testing.operator_process import operators
from reactor_dev.testing.repos import make_repo
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, edit, text
from reactor_dev.testing.tasks import kubectl_apply

pytestmark = [pytest.mark.opencode, pytest.mark.kube]

NAME = "fix-add"


def secret(cluster, namespace: str, name: str, data: dict[str, str]) -> None:
    manifest = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
                "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}
    out = cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    assert out.returncode == 0, out.stderr


def test_a_queued_result_with_a_pull_request_is_merged_through_the_forge(crd_installed, namespace, work_dir,
                                                                         gitea, tmp_path):
    repo = f"queue-{namespace[-8:]}"
    url = gitea.create_repository(repo, make_repo(tmp_path / "app"))
    secret(crd_installed, namespace, "git-creds", {"username": "reactor", "password": gitea.password})
    secret(crd_installed, namespace, "forge-token", {"token": gitea.token})
    flags = ("--forge-token-secret", "forge-token", "--forge-host", urlsplit(url).netloc, "--pr-check-interval", "1s")
    repository = {"url": url, "branch": "main", "credentialsSecretRef": {"name": "git-creds"}}
    steps = [edit("calc.py", "return a - b", "return a + b"), text("Fixed.")]
    with operators(crd_installed, namespace, work_dir) as start, ScriptedModel([Scenario(f"{NAME}:", steps)]) as model:
        op = start(*flags)
        assert kubectl_apply(op.cluster, namespace, {
            "apiVersion": "reactor.dev/v1alpha1", "kind": "MergeQueue", "metadata": {"name": "main"},
            "spec": {"repository": repository, "maxBatch": 4}}).returncode == 0
        assert kubectl_apply(op.cluster, namespace, {
            "apiVersion": "reactor.dev/v1alpha1", "kind": "AgentTask", "metadata": {"name": NAME},
            "spec": {"description": "Fix add", "prompt": f"{NAME}: fix add() in calc.py so the tests pass",
                     "repository": repository, "test": {"command": "python3 -m pytest -q -p no:cacheprovider"},
                     "agent": {"config": model.opencode_config()}, "timeout": "3m", "integrate": "queue",
                     "result": {"kind": "pullRequest", "forge": "gitea"}}}).returncode == 0
        obj = op.wait_for(NAME, lambda o: ((o or {}).get("status") or {}).get("integration", {}).get("state")
                          in ("Integrated", "Ejected"), timeout=300, what="integrated")
        integration = obj["status"]["integration"]
        assert integration["state"] == "Integrated", integration
        # Its PR reads merged, in the task's status too (the operator follows open PRs).
        obj = op.wait_for(NAME, lambda o: (o["status"].get("pullRequest") or {}).get("state") == "merged",
                          timeout=60, what="the pull request recorded as merged")
    pulls = gitea.pull_requests(repo)
    assert len(pulls) == 1 and pulls[0]["merged"], pulls
    main = gitea.api("GET", f"/repos/reactor/{repo}/branches/main").json()["commit"]["id"]
    # The base is exactly the commit the queue tested: the PR's head, carrying the result.
    assert pulls[0]["head"]["sha"] == main == integration["baseCommit"]
    assert pulls[0]["number"] == obj["status"]["pullRequest"]["number"]
    calc = gitea.api("GET", f"/repos/reactor/{repo}/raw/calc.py", params={"ref": "main"}).text
    assert "return a + b" in calc
