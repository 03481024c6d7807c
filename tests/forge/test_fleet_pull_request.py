"""Many replicas, one pull request: a real kube-apiserver, `reactor operator --fleet` replicas
as real processes (each with its own work dir), real opencode, real git, a real Gitea, the
scripted model.

Gitea does not serialise concurrent creates (three at once made three PRs), so two replicas
that both found a task's PR missing would both open one. The task's claim lets one through:
the replica that ran the task publishes under it, and a finished task whose replica died
before its PR is claimed again before anyone takes the PR up. Here r0 runs the task and dies
between the push and the PR while r1 and r2 watch its Lease: both go for the PR once the
Lease expires."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from reactor.kube.pullrequests import CRASH_HOOK
from reactor_dev.testing.fleet import fleet_args
from reactor_dev.testing.helpers import wait_for
from reactor_dev.testing.operator_process import operators
from reactor_dev.testing.repos import make_repo
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, edit, text
from reactor_dev.testing.tasks import agent_task, apply_secret, kubectl_apply

pytestmark = [pytest.mark.opencode, pytest.mark.kube, pytest.mark.timeout(600)]

NAME = "race"
LEASE = 6  # seconds


def pull_request_condition(obj: dict | None) -> dict:
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions") or []
                 if c["type"] == "PullRequestOpened"), {})


def test_two_replicas_racing_for_a_missing_pull_request_open_exactly_one(crd_installed, namespace, gitea, tmp_path,
                                                                         monkeypatch):
    repo = f"fleet-{namespace[-8:]}"
    url = gitea.create_repository(repo, make_repo(tmp_path / "app"))
    apply_secret(crd_installed, namespace, "git-creds", {"username": "reactor", "password": gitea.password})
    apply_secret(crd_installed, namespace, "forge-token", {"token": gitea.token})
    flags = ("--forge-token-secret", "forge-token", "--forge-host", urlsplit(url).netloc, "--pr-check-interval", "1s")

    with operators(crd_installed, namespace, tmp_path / "unused") as start, \
            ScriptedModel([Scenario(f"{NAME}:", [edit("calc.py", "return a - b", "return a + b"), text("Fixed.")])]) \
            as model:
        def replica(index: int):
            return start(*fleet_args(index, namespace, LEASE, *flags), work_dir=tmp_path / f"replica-{index}")

        # 1. r0 claims the task; then r1 and r2 join (the task is r0's: they leave it).
        monkeypatch.setenv(CRASH_HOOK, "pr:find")  # r0 dies before its first forge call
        r0 = replica(0)
        task = agent_task(NAME, url, model, timeout="3m", result={"kind": "pullRequest", "forge": "gitea"},
                          repository={"url": url, "branch": "main", "credentialsSecretRef": {"name": "git-creds"}})
        assert kubectl_apply(crd_installed, namespace, task).returncode == 0
        r0.wait_for(NAME, lambda o: ((o.get("status") or {}).get("claim") or {}).get("replica") == "r0", 60,
                    "claimed by r0")
        monkeypatch.delenv(CRASH_HOOK)
        others = [replica(1), replica(2)]

        # 2. r0 pushes the result and dies before the PR; both others watch its Lease expire
        # and go for the missing PR at about the same moment. One claims it and opens it.
        wait_for(lambda: r0.process.poll() is not None, 240, "r0 killed at pr:find", detail=r0.log)
        obj = r0.get(NAME)
        assert obj["status"]["phase"] == "Succeeded" and obj["status"]["result"]["pushed"], obj["status"]
        assert "pullRequest" not in obj["status"] and gitea.pull_requests(repo) == []
        obj = others[0].wait_for(NAME, lambda o: pull_request_condition(o).get("status") == "True", 120,
                                 "PullRequestOpened=True")
        recorded = obj["status"]["pullRequest"]
    # (The replicas are stopped here; a second PR made at any time would be on the forge.)
    claims = {r.work_dir.name: r.log_path.read_text().count("claimed to take up its pull request") for r in others}

    pulls = gitea.pull_requests(repo)
    assert len(pulls) == 1, [(p["number"], p["head"]["ref"]) for p in pulls]
    assert recorded["number"] == pulls[0]["number"] and recorded["headCommit"] == obj["status"]["result"]["commit"]
    assert pull_request_condition(obj)["reason"] == "Created"
    assert obj["status"]["claim"]["replica"] in ("r1", "r2") and sum(claims.values()) == 1, claims
