"""`reactor run --result pr` as a user runs it: a real subprocess, real opencode, real git, a
real Gitea as the repository's origin, the scripted model. The token in $REACTOR_FORGE_TOKEN
never reaches the cell (REACTOR_* variables are withheld from every cell)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from reactor.forge import STATUS_CONTEXT
from reactor_dev.testing.repos import git, make_repo
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, bash, edit, text
from reactor_dev.testing.workers import port_range

pytestmark = pytest.mark.opencode


def test_run_opens_the_pull_request_on_the_origin(gitea, tmp_path, work_dir):
    repo = make_repo(tmp_path / "cli-app")
    url = gitea.create_repository("cli-app", repo)
    git(repo, "remote", "add", "origin", url)
    steps = [edit("calc.py", "return a - b", "return a + b"), bash("env > cell-env.txt"), text("Fixed.")]
    with ScriptedModel([Scenario("CLI-1", steps)]) as model:
        config = tmp_path / "opencode.json"
        config.write_text(json.dumps(model.opencode_config()))
        env = {**gitea.git_env(), "REACTOR_FORGE_TOKEN": gitea.token}
        out = subprocess.run([sys.executable, "-m", "reactor.cli", "run", "--task", "CLI-1", "--desc", "Fix add",
                              "--prompt", "CLI-1: fix add() in calc.py", "--opencode-config", str(config),
                              "--port-range", port_range("18700-18800"), "--result", "pr", "--forge", "gitea", "--json",
                              "--work-dir", str(work_dir)], cwd=repo, env=env, capture_output=True, text=True,
                             timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    pulls = gitea.pull_requests("cli-app")
    assert len(pulls) == 1 and result["pull_request"] == pulls[0]["html_url"]
    assert pulls[0]["head"]["ref"] == "reactor/CLI-1" and result["commit"] in pulls[0]["body"]
    assert "passed" in pulls[0]["body"]
    assert {(s["context"], s["status"]) for s in gitea.statuses("cli-app", result["commit"])} == {
        (STATUS_CONTEXT, "success")}
    cell_env = git(repo, "show", f"{result['commit']}:cell-env.txt")
    assert "OPENCODE_SERVER_PASSWORD" in cell_env and gitea.token not in cell_env
    assert gitea.token not in out.stdout + out.stderr
