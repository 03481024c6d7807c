"""A cell is untrusted: the agent (driven by the scripted model through its own bash tool)
and the repository's test command attack the machine while a second task runs beside them.
Every attempt must fail, the attacker's legitimate work must still be committed, and the
victim's result must be unaffected. Real opencode, real git, real Landlock."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from reactor.infra.worktrees import repository_key
from reactor_dev.testing.attacks import (REPORT, Targets, assert_every_attempt_blocked, attack_program, attack_step,
                                        fingerprint, snoop_targets)
from reactor_dev.testing.repos import BUGGY_CALC, TEST_CALC, make_repo
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, edit, set_event, text, wait_for, write
from reactor.workflow.tcr import run_task
from reactor.workflow.types import Outcome, TaskSpec
from reactor_dev.testing.repos import git, worktrees_of
from reactor_dev.testing.workers import port_range

pytestmark = pytest.mark.opencode

FIX = edit("calc.py", "return a - b", "return a + b")
FIXED_CALC = BUGGY_CALC.replace("a - b", "a + b")


def checkout_path(work_dir: Path, repo: Path, slot: str) -> Path:
    return work_dir / "worktrees" / repository_key(repo.resolve()) / slot


def targets_for(repo: Path, work_dir: Path, tmp_path: Path, secret_file: Path, operator_pid: int) -> Targets:
    return Targets(
        outside_file=str(tmp_path / "outside.txt"),
        other_checkout_file=str(checkout_path(work_dir.resolve(), repo, "VICTIM") / "calc.py"),
        source_git_dir=str(repo / ".git"),
        other_branch="refs/heads/reactor/OLD",
        protected_files=[str(secret_file)],
        operator_pid=operator_pid,
    )


def assert_shared_state_untouched(repo: Path, before: dict[str, str], tmp_path: Path) -> None:
    assert fingerprint(repo / ".git") == before, "hooks, config and refs of the shared repository are unchanged"
    assert not (tmp_path / "outside.txt").exists()
    assert git(repo, "status", "--porcelain") == "", "the user's checkout is untouched"


def victim_scenario(up: threading.Event, attacked: threading.Event) -> Scenario:
    """The task beside the attacker: alive (its server up, waiting on the model) while the
    attack runs, then does its own work."""
    return Scenario("VICTIM", [set_event(up), wait_for(attacked), FIX, write("victim.py", "VICTIM = 1\n"),
                               text("Fixed add() and added victim.py.")])


def assert_victim_result(repo: Path, result) -> None:
    assert result.outcome is Outcome.COMMITTED, result.message
    assert sorted(git(repo, "diff", "--name-only", "main", "reactor/VICTIM").split()) == ["calc.py", "victim.py"]
    assert git(repo, "show", "reactor/VICTIM:calc.py") == FIXED_CALC.strip()


@pytest.mark.needs("landlock")
async def test_an_agent_attacking_from_its_bash_tool_reaches_nothing(repo, work_dir, tmp_path, secret_file,
                                                                     confined_engine):
    git(repo, "branch", "reactor/OLD")  # another task's finished result
    before = fingerprint(repo / ".git")
    up, attacked = threading.Event(), threading.Event()
    targets = targets_for(repo, work_dir, tmp_path, secret_file, os.getpid())
    targets.snoop = snoop_targets(work_dir, tmp_path, "VICTIM", checkout_path(work_dir.resolve(), repo, "VICTIM"))
    attacker = Scenario("ATTACKER", [wait_for(up), attack_step(targets), set_event(attacked), FIX,
                                     text("Fixed add().")])
    with ScriptedModel([attacker, victim_scenario(up, attacked)]) as model:
        def spec(task_id):
            return TaskSpec(task_id=task_id, prompt=f"{task_id}: fix add() in calc.py", repo=repo,
                            test_command="python3 -m pytest -q", opencode_config=model.opencode_config(), timeout=240)
        results = await asyncio.gather(run_task(spec("ATTACKER"), confined_engine),
                                       run_task(spec("VICTIM"), confined_engine))

    attacker_result, victim_result = results
    assert attacker_result.outcome is Outcome.COMMITTED and attacker_result.confined, attacker_result.message
    assert sorted(attacker_result.files_changed) == ["attack-report.txt", "calc.py"]
    assert git(repo, "show", "reactor/ATTACKER:calc.py") == FIXED_CALC.strip(), "the attacker's real fix is committed"
    assert_every_attempt_blocked(git(repo, "show", f"reactor/ATTACKER:{REPORT}"), snooped=targets.snoop)
    assert_victim_result(repo, victim_result)
    git(repo, "branch", "-D", "reactor/ATTACKER", "reactor/VICTIM")
    assert_shared_state_untouched(repo, before, tmp_path)
    assert worktrees_of(repo, work_dir) == []


@pytest.mark.needs("landlock")
async def test_the_repositorys_test_command_attacking_reaches_nothing(tmp_path, work_dir, secret_file,
                                                                      confined_engine):
    """The test command is the repository's own code: here it runs the hostile program
    before the real tests."""
    repo = tmp_path / "hostile"
    targets = targets_for(repo, work_dir, tmp_path, secret_file, os.getpid())
    make_repo(repo, {"calc.py": BUGGY_CALC, "test_calc.py": TEST_CALC, "attack.py": attack_program(targets)})
    git(repo, "branch", "reactor/OLD")
    before = fingerprint(repo / ".git")
    up, attacked = threading.Event(), threading.Event()
    with ScriptedModel([Scenario("ATTACKER", [wait_for(up), FIX, text("Fixed add().")]),
                        victim_scenario(up, attacked)]) as model:
        def spec(task_id, test_command):
            return TaskSpec(task_id=task_id, prompt=f"{task_id}: fix add() in calc.py", repo=repo,
                            test_command=test_command, opencode_config=model.opencode_config(), timeout=240)
        attacker = asyncio.create_task(run_task(spec("ATTACKER", "python3 attack.py && python3 -m pytest -q"),
                                                confined_engine))
        victim = asyncio.create_task(run_task(spec("VICTIM", "python3 -m pytest -q"), confined_engine))
        attacker_result = await attacker
        attacked.set()
        victim_result = await victim

    assert attacker_result.outcome is Outcome.COMMITTED, attacker_result.message
    assert attacker_result.files_changed == ["calc.py"], "the test run's report is not part of the change"
    assert_every_attempt_blocked(attacker_result.test_output_tail)
    assert_victim_result(repo, victim_result)
    git(repo, "branch", "-D", "reactor/ATTACKER", "reactor/VICTIM")
    assert_shared_state_untouched(repo, before, tmp_path)


@pytest.mark.needs("landlock")
def test_reactor_run_parallel_with_an_attacker_beside_a_victim(repo, work_dir, tmp_path, secret_file):
    """`reactor run --parallel`: both cells in one Reactor process (the attacker's target
    for signals and /proc), the credential hidden by --protected-path."""
    git(repo, "branch", "reactor/OLD")
    before = fingerprint(repo / ".git")
    up, attacked = threading.Event(), threading.Event()
    with ScriptedModel([victim_scenario(up, attacked)]) as model:
        config = tmp_path / "opencode.json"
        config.write_text(json.dumps(model.opencode_config()))
        run = subprocess.Popen(
            [sys.executable, "-m", "reactor.cli", "run", "--parallel", "--task", "ATTACKER,VICTIM",
             "--prompt", "ATTACKER: fix add,VICTIM: fix add", "--test-cmd", "python3 -m pytest -q",
             "--opencode-config", str(config), "--port-range", port_range("18700-18800"), "--work-dir", str(work_dir),
             "--protected-path", str(secret_file), "--json"],
            cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # The attacker learns the Reactor process's PID the way a cell could (its server's parent).
        targets = targets_for(repo, work_dir, tmp_path, secret_file, run.pid)
        # The run's own temp dir is private: under the work dir, which no cell may read.
        targets.snoop = snoop_targets(work_dir, tmp_path, "VICTIM", checkout_path(work_dir.resolve(), repo, "VICTIM"))
        model.script.add(Scenario("ATTACKER", [wait_for(up), attack_step(targets), set_event(attacked), FIX,
                                               text("Fixed add().")]))
        try:
            out, err = run.communicate(timeout=400)
        finally:
            run.kill()
    assert run.returncode == 0, out + err
    assert "cells confined: Landlock ABI" in err
    results = {r["task_id"]: r for r in map(json.loads, out.splitlines())}
    assert results["ATTACKER"]["outcome"] == "committed" and results["ATTACKER"]["confined"] is True
    assert_every_attempt_blocked(git(repo, "show", f"reactor/ATTACKER:{REPORT}"), snooped=targets.snoop)
    assert git(repo, "show", "reactor/ATTACKER:calc.py") == FIXED_CALC.strip()
    assert results["VICTIM"]["outcome"] == "committed"
    assert sorted(git(repo, "diff", "--name-only", "main", "reactor/VICTIM").split()) == ["calc.py", "victim.py"]
    git(repo, "branch", "-D", "reactor/ATTACKER", "reactor/VICTIM")
    assert_shared_state_untouched(repo, before, tmp_path)


def test_a_kernel_without_landlock_is_refused_unless_unconfined_is_allowed(repo, work_dir, tmp_path):
    """Simulated through REACTOR_LANDLOCK_ABI=0: no silent downgrade, and an explicit
    --allow-unconfined says what it costs on every run and in every result."""
    env = {**os.environ, "REACTOR_LANDLOCK_ABI": "0"}
    base = [sys.executable, "-m", "reactor.cli", "run", "--task", "T", "--prompt", "T: x", "--test-cmd", "true",
            "--work-dir", str(work_dir), "--port-range", port_range("18700-18800"), "--json"]
    refused = subprocess.run(base, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "cannot confine cells: Landlock unavailable" in refused.stderr and "--allow-unconfined" in refused.stderr
    assert git(repo, "branch", "--list", "reactor/*") == "" and worktrees_of(repo, work_dir) == []

    with ScriptedModel([Scenario("T:", [write("t.txt", "t\n"), text("done")])]) as model:
        config = tmp_path / "opencode.json"
        config.write_text(json.dumps(model.opencode_config()))
        allowed = subprocess.run([*base, "--allow-unconfined", "--opencode-config", str(config)], cwd=repo, env=env,
                                 capture_output=True, text=True, timeout=300)
    assert allowed.returncode == 0, allowed.stderr
    assert "cells run UNCONFINED" in allowed.stderr
    assert json.loads(allowed.stdout)["confined"] is False
