"""`reactor run` and `reactor cleanup` as a user runs them: a real subprocess, real opencode,
real git, the scripted model (pointed at through --opencode-config)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from reactor.infra.processes import find_marked_processes
from reactor_dev.testing.attacks import TESTED_MARK, hanging_filters, plant_hanging_filter
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, edit, hang, text, write
from reactor_dev.testing.helpers import wait_for
from reactor_dev.testing.repos import git, worktrees_of
from reactor_dev.testing.workers import port_range

pytestmark = pytest.mark.opencode

FIX = edit("calc.py", "return a - b", "return a + b")


def reactor(*args: str, work_dir, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reactor.cli", *args, "--work-dir", str(work_dir)],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def config_file(tmp_path):
    def write_config(model: ScriptedModel):
        path = tmp_path / "opencode.json"
        path.write_text(json.dumps(model.opencode_config()))
        return str(path)
    return write_config


def test_run_commits_a_passing_fix_and_prints_json(repo, work_dir, config_file):
    with ScriptedModel([Scenario("TASK-001", [FIX, text("Fixed.")])]) as model:
        out = reactor("run", "--task", "TASK-001", "--desc", "Fix add", "--prompt", "TASK-001: fix add() in calc.py",
                      "--opencode-config", config_file(model), "--port-range", port_range("18600-18700"), "--json",
                      work_dir=work_dir, cwd=repo)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["outcome"] == "committed" and result["branch"] == "reactor/TASK-001"
    assert result["commit"] == git(repo, "rev-parse", "reactor/TASK-001")
    assert result["test_command"] == "python3 -m pytest -q", "detected from the repository"
    for phase in ("Bootstrapping", "Executing", "Testing", "Committing", "TearingDown", "Succeeded"):
        assert f"[TASK-001] {phase}" in out.stderr
    assert worktrees_of(repo, work_dir) == []


def test_run_exits_1_when_the_tests_fail(repo, work_dir, config_file):
    main_before = git(repo, "rev-parse", "main")
    with ScriptedModel([Scenario("TASK-BAD", [edit("calc.py", "return a - b", "return a * b"), text("Done.")])]) as m:
        out = reactor("run", "--task", "TASK-BAD", "--prompt", "TASK-BAD: fix add", "--test-cmd", "python3 -m pytest -q",
                      "--opencode-config", config_file(m), "--port-range", port_range("18600-18700"), work_dir=work_dir, cwd=repo)
    assert out.returncode == 1
    assert "FAIL TASK-BAD: TestsFailed: tests failed (exit 1)" in out.stdout
    assert git(repo, "branch", "--list", "reactor/*") == "" and git(repo, "rev-parse", "main") == main_before


def test_parallel_tasks_on_one_repository_get_three_branches(repo, work_dir, config_file):
    scenarios = [Scenario(f"P-{i}:", [write(f"feature_{i}.py", f"VALUE = {i}\n"), text("Added.")]) for i in (1, 2, 3)]
    with ScriptedModel(scenarios) as model:
        out = reactor("run", "--parallel", "--task", "P-1,P-2,P-3", "--desc", "One,Two,Three",
                      "--prompt", "P-1: add feature_1.py,P-2: add feature_2.py,P-3: add feature_3.py",
                      "--test-cmd", "ls feature_*.py",
                      "--opencode-config", config_file(model), "--port-range", port_range("18600-18700"), "--json",
                      work_dir=work_dir, cwd=repo)
    assert out.returncode == 0, out.stdout + out.stderr
    results = [json.loads(line) for line in out.stdout.splitlines()]
    assert sorted(r["task_id"] for r in results) == ["P-1", "P-2", "P-3"]
    for i, desc in ((1, "One"), (2, "Two"), (3, "Three")):
        branch = f"reactor/P-{i}"
        assert git(repo, "log", "-1", "--format=%s", branch) == f"Task P-{i}: {desc}"
        assert git(repo, "diff", "--name-only", "main", branch) == f"feature_{i}.py", "each cell saw only its own work"
    assert worktrees_of(repo, work_dir) == []


def test_run_protect_refuses_a_change_to_the_tests(repo, work_dir, config_file):
    weaken = edit("test_calc.py", "== 5", "== -1")
    with ScriptedModel([Scenario("TASK-WEAK", [weaken, text("Done.")])]) as model:
        out = reactor("run", "--task", "TASK-WEAK", "--prompt", "TASK-WEAK: make the tests pass", "--protect", "test_*.py",
                      "--test-cmd", "python3 -m pytest -q", "--opencode-config", config_file(model),
                      "--port-range", port_range("18600-18700"), work_dir=work_dir, cwd=repo)
    assert out.returncode == 1, out.stderr
    assert "FAIL TASK-WEAK: TestsModified: the agent changed protected paths: test_calc.py" in out.stdout
    assert git(repo, "branch", "--list", "reactor/*") == ""


@pytest.mark.parametrize(("args", "message"), [
    (["--parallel", "--task", "A,B", "--prompt", "only one"], "same number of items"),
    (["--task", "A", "--prompt", "x", "--port-range", "9000-8000"], "port range"),
    (["--task", "A", "--prompt", "x", "--model", "claude"], "provider/model"),
    (["--task", "A", "--prompt", "x", "--timeout", "soon"], "not a duration"),
    (["--task", "A", "--prompt", "x", "--stall-timeout", "never"], "not a duration"),
])
def test_bad_usage_exits_2_with_a_clear_message(repo, work_dir, args, message):
    out = reactor("run", *args, work_dir=work_dir, cwd=repo, timeout=60)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_not_a_repository_fails_with_exit_1_and_leaves_nothing(tmp_path, work_dir):
    plain = tmp_path / "plain"
    plain.mkdir()
    out = reactor("run", "--task", "T", "--prompt", "x", "--test-cmd", "true", work_dir=work_dir, cwd=plain, timeout=60)
    assert out.returncode == 1 and "is not a git repository" in out.stdout
    assert find_marked_processes(str(work_dir.resolve())) == [], "no server was started"
    # Its transcript (what happened, for `reactor logs`) is all it keeps: no worktree, no cell state.
    assert [p for p in work_dir.rglob("*") if p.is_file() and "transcripts" not in p.parts] == []
    assert list(plain.iterdir()) == [], "the directory was not touched"


def test_cleanup_after_a_crashed_run(repo, work_dir, config_file):
    """SIGKILL `reactor run` mid-task: its cell ends with it (each cell's launcher gets a
    signal when its parent dies and kills the whole cell), its checkout stays; `reactor
    cleanup` removes that, and touches nothing else."""
    with ScriptedModel([Scenario("CRASH", [hang(times=100)])]) as model:
        run = subprocess.Popen([sys.executable, "-m", "reactor.cli", "run", "--task", "CRASH", "--prompt", "CRASH: x",
                                "--test-cmd", "true", "--opencode-config", config_file(model),
                                "--port-range", port_range("18600-18700"), "--work-dir", str(work_dir)],
                               cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
        deadline = time.monotonic() + 120
        while not any(r.get("kind") == "hang" for r in model.requests):
            assert time.monotonic() < deadline and run.poll() is None
            time.sleep(0.05)
        assert find_marked_processes(str(work_dir.resolve())), "the cell runs"
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        wait_for(lambda: find_marked_processes(str(work_dir.resolve())) == [], 30, "the cell ended with reactor run")
        assert len(worktrees_of(repo, work_dir)) == 1

        out = reactor("cleanup", "--repo", str(repo), work_dir=work_dir, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "removed worktree" in out.stdout
    assert find_marked_processes(str(work_dir.resolve())) == []
    assert worktrees_of(repo, work_dir) == [] and git(repo, "branch", "--list", "reactor/*") == ""


def signal_state(pid: int) -> str:
    """The process's (and each thread's) blocked, ignored, caught and pending signal masks."""
    lines = []
    for task in sorted(os.listdir(f"/proc/{pid}/task")):
        with open(f"/proc/{pid}/task/{task}/status") as status:
            masks = [line.split() for line in status if line.startswith(("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt"))]
        lines.append(f"{task}: " + " ".join(f"{k}{v}" for k, v in masks))
    return "; ".join(lines)


@pytest.mark.timeout(400)
def test_sigint_while_a_commit_hangs_exits_and_leaves_nothing(repo, work_dir, config_file):
    """Ctrl-C's signal, sent to `reactor run` alone (not its process group, so Reactor itself
    must stop what runs) while a clean filter the agent planted hangs the commit: it exits
    130 and leaves no process, filter, worktree, branch or cell state."""
    with ScriptedModel([Scenario("CTRL-C", [plant_hanging_filter(), FIX, text("Fixed.")])]) as model:
        # Started as a terminal starts it: SIGINT at its default. A suite launched in the
        # background of a script (`make test &`) inherits SIGINT ignored, which Python (and so
        # reactor) rightly keeps; the signal would then never arrive (measured: three runs).
        as_from_a_terminal = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                              "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"]
        run = subprocess.Popen([*as_from_a_terminal, "-m", "reactor.cli", "run", "--task", "CTRL-C", "--prompt", "CTRL-C: x",
                                "--test-cmd", f"python3 -m pytest -q && touch {TESTED_MARK}",
                                "--opencode-config", config_file(model), "--port-range", port_range("18600-18700"),
                                "--work-dir", str(work_dir)],
                               cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, "PYTHONFAULTHANDLER": "1"})
        try:
            seen = []
            for line in run.stderr:  # the phases, as the user sees them
                seen.append(line)
                if "[CTRL-C] Committing" in line:
                    break
            assert seen and "[CTRL-C] Committing" in seen[-1], "".join(seen)
            deadline = time.monotonic() + 60
            while not hanging_filters(work_dir):  # the commit's `git add` is stuck in the filter
                assert time.monotonic() < deadline and run.poll() is None, "the filter never ran"
                time.sleep(0.05)
            before = signal_state(run.pid)
            os.kill(run.pid, signal.SIGINT)
            try:
                assert run.wait(timeout=30) == 130
            except subprocess.TimeoutExpired:  # where it waits: its signal state, its threads' stacks (faulthandler)
                seen.append(f"signal state before SIGINT: {before}; 30 s after: {signal_state(run.pid)}\n")
                os.kill(run.pid, signal.SIGABRT)
                try:
                    rest = run.communicate(timeout=10)[1]
                except subprocess.TimeoutExpired:
                    os.killpg(run.pid, signal.SIGKILL)
                    rest = run.communicate()[1]
                pytest.fail("still running 30 s after SIGINT; its stderr:\n" + "".join(seen) + rest)
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
    assert hanging_filters(work_dir) == [] and find_marked_processes(str(work_dir.resolve())) == []
    assert worktrees_of(repo, work_dir) == [] and git(repo, "branch", "--list", "reactor/*") == ""
    assert not any((work_dir / "cells").iterdir()) if (work_dir / "cells").exists() else True
