import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from reactor.errors import ConfigurationError
from reactor.infra.processes import Owner
from reactor.infra.worktrees import WorktreeManager
from reactor_dev.testing.repos import git, worktrees_of


def test_worktree_on_a_fresh_branch_leaves_base_and_checkout_alone(repo, work_dir):
    base_before = git(repo, "rev-parse", "main")
    manager = WorktreeManager(work_dir / "worktrees")
    wt = manager.create(repo, "TASK-1", "main")
    assert wt.branch == "reactor/TASK-1" and wt.path.is_dir()
    assert not str(wt.path).startswith(str(repo)), "worktrees live outside the user's checkout"
    (wt.path / "calc.py").write_text("changed\n")
    (wt.path / "new.txt").write_text("new\n")
    assert sorted(wt.changed_paths()) == ["calc.py", "new.txt"]
    sha = wt.commit("Task TASK-1: fix", wt.changed_paths())
    assert git(repo, "branch", "--list", "reactor/TASK-1") == "", "the source gets the branch only when accepted"
    manager.accept(wt, sha, ["calc.py", "new.txt"])
    assert git(repo, "rev-parse", "reactor/TASK-1") == sha
    assert git(repo, "rev-parse", "main") == base_before
    assert git(repo, "status", "--porcelain") == "", "the user's checkout is untouched"
    manager.remove(wt, keep_branch=True)
    assert worktrees_of(repo, work_dir) == [] and not wt.path.exists()
    assert git(repo, "log", "-1", "--format=%s", "reactor/TASK-1") == "Task TASK-1: fix"


def test_revert_throws_everything_away_and_remove_deletes_an_empty_branch(repo, work_dir):
    manager = WorktreeManager(work_dir / "worktrees")
    wt = manager.create(repo, "T2", "main")
    (wt.path / "calc.py").write_text("broken\n")
    (wt.path / "junk.txt").write_text("junk\n")
    wt.revert()
    assert wt.changed_paths() == []
    manager.remove(wt, keep_branch=False)
    assert git(repo, "branch", "--list", "reactor/T2") == ""


def test_many_worktrees_of_one_repository_at_once(repo, work_dir):
    manager = WorktreeManager(work_dir / "worktrees")
    ids = [f"P{i}" for i in range(12)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        trees = list(pool.map(lambda i: manager.create(repo, i, "main"), ids))
    assert len(worktrees_of(repo, work_dir)) == 12
    with ThreadPoolExecutor(max_workers=12) as pool:
        list(pool.map(lambda wt: manager.remove(wt, keep_branch=False), trees))
    assert worktrees_of(repo, work_dir) == []
    assert git(repo, "branch", "--list", "reactor/*") == ""


def test_clear_errors_for_bad_input(tmp_path, repo, work_dir):
    manager = WorktreeManager(work_dir / "worktrees")
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ConfigurationError, match="not a git repository"):
        manager.create(plain, "T", "main")
    with pytest.raises(ConfigurationError, match=r"base branch 'nope' does not exist .*branches: main"):
        manager.create(repo, "T", "nope")
    with pytest.raises(ConfigurationError, match="not a valid git branch name"):
        manager.create(repo, "T", "main", branch="bad..name")
    git(repo, "branch", "reactor/DONE")
    with pytest.raises(ConfigurationError, match="already exists"):
        manager.create(repo, "DONE", "main")
    assert worktrees_of(repo, work_dir) == []


def test_cleanup_removes_what_a_dead_owner_left_and_keeps_results(repo, work_dir):
    # A Reactor process that is gone: a child we start and wait for.
    dead = subprocess.Popen(["true"])
    dead.wait()
    ghost = Owner(dead.pid, 12345.0)
    crashed = WorktreeManager(work_dir / "worktrees", ghost)
    empty = crashed.create(repo, "EMPTY", "main")
    result = crashed.create(repo, "RESULT", "main")
    (result.path / "r.txt").write_text("r\n")
    manager_result = result.commit("Task RESULT: done", ["r.txt"])
    crashed.accept(result, manager_result, ["r.txt"])
    live = WorktreeManager(work_dir / "worktrees").create(repo, "LIVE", "main")

    removed = WorktreeManager(work_dir / "worktrees").cleanup(repo)
    assert sorted(w.slot for w in removed) == ["EMPTY", "RESULT"]
    assert worktrees_of(repo, work_dir) == [str(live.path)]
    assert git(repo, "branch", "--list", "reactor/EMPTY") == ""
    assert git(repo, "branch", "--list", "reactor/RESULT").strip() == "reactor/RESULT"
    assert not empty.path.exists()


def test_commit_takes_only_the_given_paths_including_deletions(repo, work_dir):
    manager = WorktreeManager(work_dir / "worktrees")
    wt = manager.create(repo, "T3", "main")
    (wt.path / "test_calc.py").unlink()
    (wt.path / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    change = sorted(wt.changed_paths())
    assert change == ["calc.py", "test_calc.py"]
    (wt.path / "build-artifact.log").write_text("written by a test run\n")
    sha = wt.commit("Task T3: change", change)
    manager.accept(wt, sha, change)
    assert git(repo, "show", "--name-status", "--format=", sha).split() == ["M", "calc.py", "D", "test_calc.py"]
    manager.remove(wt, keep_branch=True)
