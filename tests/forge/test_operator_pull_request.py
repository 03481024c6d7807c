"""The operator opens the pull request: a real kube-apiserver, `reactor operator` as a real
process (killed and restarted), real opencode, real git, a real Gitea, the scripted model.

One task, followed through every fault of the PR path (the suite's budget allows one full
run): the operator SIGKILLed at each step between the push and the recorded PR, then the
forge down when the PR is due; at the end exactly one PR, whose body holds the passing test
output and whose head carries reactor/tcr = success; the forge token nowhere a cell or a
reader of the cluster could see it. Then a task stacked on it (spec.dependsOn) opens its PR
onto the first task's branch, and once the first PR is merged on the forge (which the status
shows) the stacked PR is retargeted to main."""

from __future__ import annotations

from urllib.parse import urlsplit

import json
from pathlib import Path

import psutil
import pytest

from reactor.forge import STATUS_CONTEXT
from reactor.kube.pullrequests import CRASH_HOOK
from reactor_dev.testing.helpers import install_crds, wait_for
from reactor_dev.testing.operator_process import operators
from reactor_dev.testing.repos import make_repo
from reactor_dev.testing.tasks import apply_secret
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, bash, edit, text, write

pytestmark = [pytest.mark.opencode, pytest.mark.kube, pytest.mark.timeout(900)]

NAME = "fix-add"
# The agent fixes the bug, then records what its cell can see: its environment and every
# process's command line (committed with the fix, so the test reads them from the forge).
SPY = bash("env > cell-env.txt; for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done > cell-ps.txt 2>/dev/null; true")
STEPS = [edit("calc.py", "return a - b", "return a + b"), SPY, text("Fixed.")]
CHILD = "notes"  # stacked on NAME
CHILD_STEPS = [write("NOTES.md", "add() adds its arguments\n"), text("Noted.")]
# Crash points of the PR path (reactor.forge.publish), in order: before the lookup, before
# the create, after the create (before the commit status), after everything but the status write.
CRASHES = ["find", "create", "status", "done"]


@pytest.fixture(scope="module")
def cluster(control_plane):
    install_crds(control_plane)
    return control_plane


def condition(obj: dict, type_: str) -> dict | None:
    return next((c for c in (obj or {}).get("status", {}).get("conditions") or [] if c["type"] == type_), None)


def test_one_pull_request_through_crashes_and_an_outage(cluster, namespace, work_dir, gitea, tmp_path, monkeypatch):
    repo = f"app-{namespace[-8:]}"
    url = gitea.create_repository(repo, make_repo(tmp_path / "app"))
    apply_secret(cluster, namespace, "git-creds", {"username": "reactor", "password": gitea.password})
    apply_secret(cluster, namespace, "forge-token", {"token": gitea.token})
    flags = ("--forge-token-secret", "forge-token", "--forge-host", urlsplit(url).netloc, "--pr-check-interval", "1s")

    scenarios = [Scenario(f"{NAME}:", STEPS), Scenario(f"{CHILD}:", CHILD_STEPS)]
    with operators(cluster, namespace, work_dir) as start, ScriptedModel(scenarios) as model:
        # 1. The task runs to a pushed commit; the operator dies before its first forge call.
        monkeypatch.setenv(CRASH_HOOK, "pr:find")
        op = start(*flags)
        manifest = {"apiVersion": "reactor.dev/v1alpha1", "kind": "AgentTask", "metadata": {"name": NAME},
                    "spec": {"description": "Fix add", "prompt": f"{NAME}: fix add() in calc.py so the tests pass",
                             "repository": {"url": url, "branch": "main", "credentialsSecretRef": {"name": "git-creds"}},
                             "test": {"command": "python3 -m pytest -q"}, "agent": {"config": model.opencode_config()},
                             "timeout": "3m", "result": {"kind": "pullRequest", "forge": "gitea"}}}
        out = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
        assert out.returncode == 0, out.stderr
        wait_for(lambda: op.process.poll() is not None, 240, "the operator killed at pr:find", detail=op.log)
        obj = op.get(NAME)
        assert obj["status"]["phase"] == "Succeeded" and obj["status"]["result"]["pushed"], obj["status"]
        assert "pullRequest" not in obj["status"] and gitea.pull_requests(repo) == []
        commit = obj["status"]["result"]["commit"]

        # 2. Restarted, killed again at each later step of the PR path: never a second PR.
        for step in CRASHES[1:]:
            monkeypatch.setenv(CRASH_HOOK, f"pr:{step}")
            op = start(*flags, live=False)  # it resumes the PR at start-up: it may die before it is live
            wait_for(lambda: op.process.poll() is not None, 120, f"the operator killed at pr:{step}", detail=op.log)
            assert len(gitea.pull_requests(repo)) == (0 if step == "create" else 1), step
            assert "pullRequest" not in op.get(NAME)["status"]
        monkeypatch.delenv(CRASH_HOOK)

        # 3. The forge is down when the restarted operator gets to the PR: the task stays
        # Succeeded and says so; the PR is recorded once the forge is back.
        gitea.stop()
        op = start(*flags)
        obj = op.wait_for(NAME, lambda o: (condition(o, "PullRequestOpened") or {}).get("reason") == "ForgeUnavailable",
                          120, "PullRequestOpened=False/ForgeUnavailable")
        assert obj["status"]["phase"] == "Succeeded" and condition(obj, "Succeeded")["status"] == "True"
        assert condition(obj, "PullRequestOpened")["status"] == "False"
        gitea.start()
        obj = op.wait_for(NAME, lambda o: (condition(o, "PullRequestOpened") or {}).get("status") == "True",
                          120, "PullRequestOpened=True")

        # Exactly one PR, the proof in its body, the status on its head.
        pulls = gitea.pull_requests(repo)
        assert len(pulls) == 1, [p["number"] for p in pulls]
        pr = pulls[0]
        status = obj["status"]
        assert status["pullRequest"] == {"url": pr["html_url"], "number": pr["number"], "headCommit": commit,
                                         "state": "open", "base": "main"}
        assert condition(obj, "PullRequestOpened")["reason"] == "Created"
        assert condition(obj, "Succeeded")["reason"] == "Committed" and condition(obj, "Confined") is not None
        tail = status["result"]["testOutputTail"].strip().splitlines()[-1]
        assert "passed" in tail and tail in pr["body"] and commit in pr["body"]
        assert "python3 -m pytest -q" in pr["body"] and "1. committed" in pr["body"] and "`calc.py`" in pr["body"]
        assert pr["head"]["ref"] == f"reactor/{NAME}" and pr["base"]["ref"] == "main"
        # (set again by each try that reached that step: Gitea lists every one)
        assert {(s["context"], s["status"]) for s in gitea.statuses(repo, commit)} == {(STATUS_CONTEXT, "success")}
        wide = cluster.kubectl("get", "agenttasks", "-n", namespace, "-o", "wide").stdout
        assert pr["html_url"] in wide
        reasons = [e["reason"] for e in op.events(NAME)]
        assert "ForgeUnavailable" in reasons and "Created" in reasons
        transcript = (work_dir / "transcripts" / namespace / f"{NAME}.jsonl").read_text()
        assert pr["html_url"] in transcript  # what `reactor logs` prints

        # The token: not in the cell's environment or what it saw of every process's arguments
        # (committed by the agent), not in any process's arguments or environment now, not in
        # any file of the operator's work dir (cells, transcripts, mirrors), its log, status or Events.
        token = gitea.token
        for spied in ("cell-env.txt", "cell-ps.txt"):
            raw = gitea.api("GET", f"/repos/reactor/{repo}/raw/{spied}", params={"ref": commit})
            assert raw.status_code == 200 and raw.text.strip(), spied
            assert token not in raw.text, spied
        assert "OPENCODE_SERVER_PASSWORD" in gitea.api("GET", f"/repos/reactor/{repo}/raw/cell-env.txt",
                                                       params={"ref": commit}).text  # the spy did see its env
        for proc in psutil.process_iter():
            try:
                assert token not in " ".join(proc.cmdline()), proc
                assert token not in json.dumps(proc.environ()), proc
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        for path in Path(work_dir).rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert token.encode() not in path.read_bytes(), path
        assert token not in json.dumps(obj) and token not in json.dumps(op.events(NAME))

        # Stacked: a task on this one's result opens its PR onto this one's branch.
        stacked = {**manifest, "metadata": {"name": CHILD},
                   "spec": {**manifest["spec"], "description": "Notes", "dependsOn": [NAME],
                            "prompt": f"{CHILD}: write NOTES.md about add()"}}
        out = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(stacked))
        assert out.returncode == 0, out.stderr
        child = op.wait_for(CHILD, lambda o: (((o or {}).get("status") or {}).get("pullRequest") or {}).get("base"),
                            240, "the stacked PR recorded")
        assert child["status"]["pullRequest"]["base"] == f"reactor/{NAME}"
        assert child["status"]["result"]["startCommit"] == commit

        # Merged on the forge: the status says so, and the stacked PR is retargeted to main.
        # (Gitea answers 405 "try again later" while it re-checks mergeability after a change.)
        wait_for(lambda: gitea.api("POST", f"/repos/reactor/{repo}/pulls/{pr['number']}/merge",
                                   json={"Do": "merge", "head_commit_id": commit}).status_code == 200,
                 30, "the merge on the forge", interval=0.5)
        obj = op.wait_for(NAME, lambda o: (o["status"].get("pullRequest") or {}).get("state") == "merged", 60,
                          "pullRequest.state merged")
        assert condition(obj, "PullRequestOpened")["status"] == "True"
        child = op.wait_for(CHILD, lambda o: o["status"]["pullRequest"].get("base") == "main", 60,
                            "the stacked PR retargeted to main")
        pulls = {p["head"]["ref"]: p for p in gitea.pull_requests(repo)}
        assert sorted(pulls) == sorted([f"reactor/{NAME}", f"reactor/{CHILD}"]), "one PR per task"
        assert pulls[f"reactor/{CHILD}"]["base"]["ref"] == "main"
        assert pulls[f"reactor/{CHILD}"]["number"] == child["status"]["pullRequest"]["number"]
        assert "PullRequestRetargeted" in [e["reason"] for e in op.events(CHILD)]
