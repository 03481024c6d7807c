"""The cell's process boundary, end to end (real opencode, real git, real Landlock and
seccomp; the scripted model is the attacker, through OpenCode's bash tool):

- a task's environment (LD_PRELOAD at a shared object in its repository) acts only inside
  its confined cell, never on the launcher before confinement;
- ports of the cell range and the operator's own cannot be squatted (another task still
  starts), a unix socket outside the cell cannot be reached, and the daemons an agent leaves
  (one without Reactor's markers) are gone before the tests run: they cannot change a tested
  file before the commit, and nothing outlives the task;
- a clean filter the agent planted that hangs: Reactor's git step times out, the task fails
  saying so, nothing is left running.

The rules themselves are checked one by one in tests/infra/test_launcher.py."""

from __future__ import annotations

import asyncio
import shutil
import socket
import threading
from pathlib import Path

import psutil
import pytest

from reactor.infra import landlock
from reactor.infra.worktrees import repository_key
from reactor_dev.testing.attacks import (REPORT, BoundaryTargets, boundary_attack_step, build_preload_object,
                                     daemon_pids, parse_report)
from reactor_dev.testing.repos import BUGGY_CALC, TEST_CALC, git, make_repo, worktrees_of
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, bash, edit, set_event, text, wait_for
from reactor.workflow.engine import Engine
from reactor.workflow.tcr import run_task
from reactor.workflow.types import Outcome, Reason, TaskSpec
from reactor_dev.testing.engine import engine_settings
from reactor_dev.testing.matrix import process_alive

pytestmark = pytest.mark.opencode

FIX = edit("calc.py", "return a - b", "return a + b")
FIXED_CALC = BUGGY_CALC.replace("a - b", "a + b")


def spec(task_id: str, repo: Path, model: ScriptedModel, **kw) -> TaskSpec:
    return TaskSpec(task_id=task_id, prompt=f"{task_id}: fix add() in calc.py", repo=repo,
                    test_command="python3 -m pytest -q", opencode_config=model.opencode_config(), timeout=600, **kw)


@pytest.fixture
def operator_port():
    """A listener of the operator's own (its web page)."""
    with socket.socket() as web:
        web.bind(("127.0.0.1", 0))
        web.listen()
        yield web.getsockname()[1]


@pytest.fixture
def engine(work_dir: Path, secret_file: Path, operator_port: int) -> Engine:
    settings = engine_settings(work_dir)
    settings.confinement.protected_paths.append(str(secret_file))
    settings.confinement.protected_ports.append(operator_port)
    engine = Engine(settings)
    assert engine.confinement.enabled, engine.confinement.status.message
    yield engine
    assert engine.ports.held() == {}, "every port is released"


async def test_a_task_env_with_ld_preload_runs_nothing_before_confinement(tmp_path, work_dir, secret_file, engine):
    repo = make_repo(tmp_path / "hostile")
    shared = build_preload_object(tmp_path)
    if shared is None:
        pytest.skip("no C compiler to build the preloaded object")
    shutil.copy(shared, repo / "mark.so")
    git(repo, "add", "mark.so")
    git(repo, "commit", "--quiet", "-m", "a shared object")
    checkout = work_dir.resolve() / "worktrees" / repository_key(repo.resolve()) / "PRELOAD"
    outside = tmp_path / "ran-outside.txt"
    env = {"LD_PRELOAD": str(checkout / "mark.so"), "GCONV_PATH": str(checkout), "PROTECTED": str(secret_file),
           "MARK_INSIDE": str(checkout / ".git" / "ran-inside.txt"), "MARK_OUTSIDE": str(outside)}
    scenario = Scenario("PRELOAD", [bash("cp .git/ran-inside.txt preload-evidence.txt"), FIX, text("Fixed add().")])
    with ScriptedModel([scenario]) as model:
        result = await run_task(spec("PRELOAD", repo, model, env=env), engine)

    assert result.outcome is Outcome.COMMITTED, result.message
    assert not outside.exists(), "the task's LD_PRELOAD ran in no process outside its cell"
    evidence = git(repo, "show", "reactor/PRELOAD:preload-evidence.txt").splitlines()
    assert evidence, "the object did run, in the cell (the server and its shell loaded it)"
    assert all(line.endswith("no-secret") for line in evidence), evidence
    assert worktrees_of(repo, work_dir) == []


async def test_squatters_sockets_and_daemons_stay_in_their_cell(tmp_path, repo, work_dir, engine, operator_port):
    ports = engine.settings.port_range
    unix_socket = tmp_path / "agent.sock"  # stands in for the user's ssh-agent
    attacked, second_up = threading.Event(), threading.Event()
    targets = BoundaryTargets((ports.start, ports.end), [operator_port], str(unix_socket))
    attacker = Scenario("ATTACKER", [boundary_attack_step(targets), set_event(attacked), wait_for(second_up), FIX,
                                     text("Fixed add().")])
    second = Scenario("SECOND", [set_event(second_up), FIX, text("Fixed add().")])
    with socket.socket(socket.AF_UNIX) as listener, ScriptedModel([attacker, second]) as model:
        listener.bind(str(unix_socket))
        listener.listen()
        first = asyncio.create_task(run_task(spec("ATTACKER", repo, model), engine))
        # The next task starts once the squatting has been tried (and its daemons run).
        assert await asyncio.to_thread(attacked.wait, 180)
        later = await run_task(spec("SECOND", repo, model), engine)
        result = await first

    assert later.outcome is Outcome.COMMITTED, f"another task still gets a port: {later.message}"
    assert result.outcome is Outcome.COMMITTED, (result.message, result.phase_durations)
    report_text = git(repo, "show", f"reactor/ATTACKER:{REPORT}")
    report = parse_report(report_text)
    assert report["squat-cell-ports"].startswith("blocked (bound 0 of"), report_text
    assert report[f"bind-operator-port {operator_port}"].startswith("blocked"), report_text
    if landlock.abi_version() >= landlock.NET_ABI:
        assert "Permission denied" in report[f"bind-operator-port {operator_port}"]
    assert report["unix-socket"].startswith("blocked") and "Permission denied" in report["unix-socket"], report_text
    daemons = daemon_pids(report_text)
    assert len(daemons) == 2 and not any(process_alive(pid) for pid in daemons), "no daemon outlives its cell"
    assert git(repo, "show", "reactor/ATTACKER:calc.py") == FIXED_CALC.strip(), \
        "the file committed is the file tested: the daemons did not get to rewrite it"
    assert worktrees_of(repo, work_dir) == []


async def test_a_planted_clean_filter_that_hangs_fails_the_task_and_leaves_nothing(repo, work_dir, engine):
    engine.settings.git_step_timeout = 10.0
    plant = bash("git config filter.hang.clean 'sleep 86399' && printf '*.py filter=hang\\n' > .gitattributes")
    with ScriptedModel([Scenario("HANG", [plant, FIX, text("Fixed add().")])]) as model:
        result = await run_task(spec("HANG", repo, model), engine)

    assert result.outcome is Outcome.FAILED and result.reason is Reason.GIT_TIMED_OUT, result.message
    assert "git status" in result.message and "did not finish within 10s" in result.message
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "86399"]]
    assert left == [], "the filter was killed with the git step"
    assert git(repo, "branch", "--list", "reactor/*") == "" and worktrees_of(repo, work_dir) == []
