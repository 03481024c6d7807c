"""Planted links and planted config: what a cell leaves for the operator to follow.

- The agent replaces every file the operator used to write in its state dir (server.log,
  .profile, .bash_profile, the plugin package files) with links to files outside the cell,
  then kills its own server. Reactor restarts it: the targets are unchanged, nothing of
  them shows in the result or its events, and the agent's fix is still committed.
- The operator's global git config holds a filter, hooks, fsmonitor, a pager and an alias
  (what a followed link once could append to ~/.gitconfig): `reactor run` never runs any.

Real opencode, real git, real Landlock; the scripted model drives the agent's bash tool."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from reactor_dev.testing.hostile import hostile_git_config, plant_links_step
from reactor_dev.testing.repos import BUGGY_CALC, git
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, edit, text
from reactor.workflow.tcr import run_task
from reactor.workflow.types import Outcome, TaskSpec
from reactor_dev.testing.workers import port_range

pytestmark = pytest.mark.opencode

FIX = edit("calc.py", "return a - b", "return a + b")
FIXED_CALC = BUGGY_CALC.replace("a - b", "a + b").strip()
# Where the operator wrote before (all in the cell's state dir), and where a link sends it.
PLANTED = {"server.log": "operator-log", "home/.profile": ".gitconfig", "home/.bash_profile": ".bashrc",
           "config/opencode/package.json": "package.json", "config/opencode/package-lock.json": "package-lock.json"}


async def test_links_planted_in_the_state_dir_are_not_followed_after_a_restart(repo, work_dir, tmp_path,
                                                                               confined_engine):
    outside = tmp_path / "operator-home"
    outside.mkdir()
    originals = {}
    for name in PLANTED.values():
        originals[name] = f"ORIGINAL {name} of the operator: do-not-leak-{name}\n"
        (outside / name).write_text(originals[name])
    links = {relative: str(outside / name) for relative, name in PLANTED.items()}
    logs = work_dir.resolve() / "operator" / "logs"
    elsewhere = {str(logs / "planted.log"): str(outside / ".gitconfig")}
    events = []

    async def on_phase(event):
        events.append(event.message)

    with ScriptedModel([Scenario("PLANT", [plant_links_step(links, elsewhere), FIX, text("Fixed add().")])]) as model:
        spec = TaskSpec(task_id="PLANT", prompt="PLANT: fix add() in calc.py", repo=repo,
                        test_command="python3 -m pytest -q", opencode_config=model.opencode_config(), timeout=240)
        result = await run_task(spec, confined_engine, on_phase)
        seen_by_model = "\n".join(json.dumps(r["body"]) for r in model.requests)

    assert result.outcome is Outcome.COMMITTED, result.message
    assert result.boot_attempts >= 2, "the agent killed its server and Reactor restarted it"
    for relative, target in links.items():
        assert f"PLANTED {relative} -> {target}" in seen_by_model, "the links were planted before the restart"
        if relative != "server.log":  # the operator no longer writes there at all: the link stays, unused
            assert f"NOW {relative} is no link" in seen_by_model, f"the restart replaced {relative}"
    assert f"PLANT-ELSEWHERE {logs / 'planted.log'}: blocked (PermissionError)" in seen_by_model
    for name, content in originals.items():
        assert (outside / name).read_text() == content, f"{name} is unchanged"
    shown = "\n".join([result.message, result.test_output_tail or "", *events])
    assert "do-not-leak" not in shown, "nothing of a link target reaches the result or its events"
    assert git(repo, "show", "reactor/PLANT:calc.py") == FIXED_CALC


def test_reactor_runs_git_without_the_users_global_config(repo, work_dir, tmp_path):
    """HOME, XDG_CONFIG_HOME and GIT_CONFIG_GLOBAL of the `reactor run` process point at a
    config that runs `touch` from every place git could run a program: checkout (smudge),
    status and add (clean), commit (hooks), the result's fetch, a pager, an alias."""
    ran = tmp_path / "ran"
    home = hostile_git_config(tmp_path / "hostile-home", ran)
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "GIT_CONFIG_GLOBAL": str(home / ".gitconfig")}
    with ScriptedModel([Scenario("CONF", [FIX, text("Fixed add().")])]) as model:
        config = tmp_path / "opencode.json"
        config.write_text(json.dumps(model.opencode_config()))
        run = subprocess.run(
            [sys.executable, "-m", "reactor.cli", "run", "--task", "CONF", "--prompt", "CONF: fix add",
             "--test-cmd", "python3 -m pytest -q", "--opencode-config", str(config), "--port-range", port_range("18700-18800"),
             "--work-dir", str(work_dir), "--json"],
            cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert json.loads(run.stdout)["outcome"] == "committed"
    assert git(repo, "show", "reactor/CONF:calc.py") == FIXED_CALC
    assert not ran.exists(), "nothing of the global git config ran"
