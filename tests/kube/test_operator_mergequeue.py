"""The operator with a MergeQueue, end to end: `reactor operator` as a real process, real
opencode cells, real git, the scripted model. Two tasks with spec.integrate: queue succeed
and push; the queue integrates both into the origin's base branch, which stays green."""

from __future__ import annotations

import json
import subprocess

import pytest

from reactor_dev.testing.operator_process import operators
from reactor_dev.testing.repos import git, make_repo
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, text, write
from reactor_dev.testing.tasks import kubectl_apply

pytestmark = pytest.mark.opencode

GREEN_CALC = "def add(a, b):\n    return a + b\n"
TEST_CALC = "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"


def test_tasks_with_integrate_queue_land_on_the_base_branch(crd_installed, namespace, work_dir, tmp_path):
    work = make_repo(tmp_path / "work", {"calc.py": GREEN_CALC, "test_calc.py": TEST_CALC})
    origin = tmp_path / "origin.git"
    git(tmp_path, "clone", "--quiet", "--bare", str(work), str(origin))
    queue = {"apiVersion": "reactor.dev/v1alpha1", "kind": "MergeQueue", "metadata": {"name": "main"},
             "spec": {"repository": {"url": f"file://{origin}", "branch": "main"}, "maxBatch": 2}}
    scenarios = [Scenario(f"{name}:", [write(f"{name}.py", f"def {name}():\n    return 1\n"), text("Done.")])
                 for name in ("alpha", "beta")]
    with operators(crd_installed, namespace, work_dir) as start, ScriptedModel(scenarios) as model:
        op = start()
        assert kubectl_apply(op.cluster, namespace, queue).returncode == 0
        for name in ("alpha", "beta"):
            task = {"apiVersion": "reactor.dev/v1alpha1", "kind": "AgentTask", "metadata": {"name": name}, "spec": {
                "description": f"Add {name}", "prompt": f"{name}: add {name}.py",
                "repository": {"url": f"file://{origin}", "branch": "main"},
                "test": {"command": "python3 -m pytest -q"}, "agent": {"config": model.opencode_config()},
                "timeout": "3m", "integrate": "queue"}}
            assert kubectl_apply(op.cluster, namespace, task).returncode == 0
        for name in ("alpha", "beta"):
            obj = op.wait_for(name, lambda o: ((o or {}).get("status") or {}).get("integration", {}).get("state")
                              in ("Integrated", "Ejected"), timeout=240, what="integrated")
            assert obj["status"]["phase"] == "Succeeded" and obj["status"]["integration"]["state"] == "Integrated"
        tip = git(origin, "rev-parse", "main")
        assert obj["status"]["integration"]["baseCommit"] in git(origin, "rev-list", "main").split()
        assert sorted(git(origin, "ls-tree", "--name-only", "main").split()) == [
            "alpha.py", "beta.py", "calc.py", "test_calc.py"]
        table = op.cluster.kubectl("get", "mergequeues", "-n", namespace, "-o", "json")
        status = json.loads(table.stdout)["items"][0]["status"]
        assert (status["depth"], status["integrated"], status["baseGreen"], status["lastIntegration"]) == (0, 2, True, tip)
    # Every commit the base holds passes the tests.
    for commit in git(origin, "rev-list", "main").split():
        checkout = tmp_path / f"check-{commit[:8]}"
        git(tmp_path, "clone", "--quiet", "--shared", str(origin), str(checkout))
        git(checkout, "checkout", "--quiet", "--detach", commit)
        assert subprocess.run(["python3", "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=checkout,
                              capture_output=True).returncode == 0, commit
