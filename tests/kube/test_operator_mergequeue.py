"""The operator with a MergeQueue, end to end: `reactor operator` as a real process, real
opencode cells, real git, the scripted model. Two tasks with spec.integrate: queue change the
same line from the same base. The queue integrates the first; the second conflicts
textually, so its task goes back to a cell on the new tip holding the conflict markers,
its (scripted) agent resolves them, and its new result integrates on the second pass. The
base branch stays green throughout."""

from __future__ import annotations

import json
import subprocess

import pytest

from reactor_dev.testing.operator_process import operators
from reactor_dev.testing.repos import git, make_repo
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, bash, text, write
from reactor_dev.testing.tasks import kubectl_apply

pytestmark = pytest.mark.opencode

SHARED = "VALUE = 1\n"
TEST_SHARED = "import shared\n\n\ndef test_value():\n    assert isinstance(shared.VALUE, int)\n"
# The rebase round's agent: resolves only a checkout that holds the conflict (else it changes
# nothing and the markers fail the tests), keeping both sides' intent.
RESOLVE = bash("grep -q '^<<<<<<<' shared.py && printf 'VALUE = 2 + 3\\n' > shared.py")


def phase(obj: dict | None) -> str | None:
    return ((obj or {}).get("status") or {}).get("phase")


def integration(obj: dict | None) -> dict:
    return ((obj or {}).get("status") or {}).get("integration") or {}


def test_queued_results_land_on_the_base_branch_and_a_textual_conflict_goes_back_to_its_task(
        crd_installed, namespace, work_dir, tmp_path):
    work = make_repo(tmp_path / "work", {"shared.py": SHARED, "test_shared.py": TEST_SHARED})
    origin = tmp_path / "origin.git"
    git(tmp_path, "clone", "--quiet", "--bare", str(work), str(origin))
    url = f"file://{origin}"
    initial = int(git(origin, "rev-list", "--count", "main"))
    queue = {"apiVersion": "reactor.dev/v1alpha1", "kind": "MergeQueue", "metadata": {"name": "main"},
             "spec": {"repository": {"url": url, "branch": "main"}, "maxBatch": 2}}
    scenarios = [Scenario("no longer applies", [RESOLVE, text("Resolved the conflict.")]),
                 Scenario("alpha:", [write("shared.py", "VALUE = 2\n"), text("Done.")]),
                 Scenario("beta:", [write("shared.py", "VALUE = 3\n"), text("Done.")])]
    with operators(crd_installed, namespace, work_dir) as start, ScriptedModel(scenarios) as model:
        op = start()
        first_pass = {}
        # Both results are made on the same base before the queue exists: they must conflict.
        for name in ("alpha", "beta"):
            task = {"apiVersion": "reactor.dev/v1alpha1", "kind": "AgentTask", "metadata": {"name": name}, "spec": {
                "description": f"Change VALUE ({name})", "prompt": f"{name}: change VALUE in shared.py",
                "repository": {"url": url, "branch": "main"},
                "test": {"command": "python3 -m pytest -q -p no:cacheprovider"},
                "agent": {"config": model.opencode_config()}, "timeout": "3m", "integrate": "queue"}}
            assert kubectl_apply(op.cluster, namespace, task).returncode == 0
            obj = op.wait_for(name, lambda o: phase(o) == "Succeeded" and integration(o).get("state") == "Queued",
                              timeout=180, what="succeeded, its result queued")
            first_pass[name] = obj["status"]
        assert kubectl_apply(op.cluster, namespace, queue).returncode == 0

        beta = op.wait_for("beta", lambda o: integration(o).get("state") == "Integrated" or phase(o) == "Failed",
                           timeout=300, what="integrated on the second pass")
        alpha = op.get("alpha")
        assert integration(alpha)["state"] == "Integrated" and not alpha["status"].get("rebases")
        status = beta["status"]
        assert (status["phase"], integration(beta)["state"], status["rebases"]) == ("Succeeded", "Integrated", 1), \
            json.dumps(status, indent=1)
        # The round's own result, on a branch of its own, on the tip that alpha made.
        assert status["result"]["branch"] == "reactor/beta-rebase-1"
        alpha_commit = integration(alpha)["baseCommit"]
        assert status["result"]["startCommit"] == alpha_commit
        assert git(origin, "rev-parse", "reactor/beta") == first_pass["beta"]["result"]["commit"]
        assert [e["reason"] for e in op.events("beta")].count("Rebasing") == 1
        # The spend of both rounds counts (the budget and SpendLimits see it).
        assert status["progress"]["totalTokens"] > first_pass["beta"]["progress"]["totalTokens"]

        tip = git(origin, "rev-parse", "main")
        assert integration(beta)["baseCommit"] == tip
        assert git(origin, "show", "main:shared.py") == "VALUE = 2 + 3"
        assert int(git(origin, "rev-list", "--count", "main")) == initial + 2
        table = op.cluster.kubectl("get", "mergequeues", "-n", namespace, "-o", "json")
        queue_status = json.loads(table.stdout)["items"][0]["status"]
        assert (queue_status["depth"], queue_status["integrated"], queue_status["ejected"], queue_status["baseGreen"],
                queue_status["lastIntegration"]) == (0, 2, 1, True, tip)
    # Every commit the base holds passes the tests.
    for commit in git(origin, "rev-list", "main").split():
        checkout = tmp_path / f"check-{commit[:8]}"
        git(tmp_path, "clone", "--quiet", "--shared", str(origin), str(checkout))
        git(checkout, "checkout", "--quiet", "--detach", commit)
        assert subprocess.run(["python3", "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=checkout,
                              capture_output=True).returncode == 0, commit
