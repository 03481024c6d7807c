"""Tasks on tasks, the checkout's side: a cell starts at a given commit (another task's
result) or at Reactor's merge of several, and its result must sit on exactly that commit."""

import pytest

from reactor.errors import ConfigurationError
from reactor.infra.worktrees import ParentsConflict, ResultRejected, WorktreeManager, integrate
from reactor_dev.testing.repos import git


def result_of(manager: WorktreeManager, repo, task: str, files: dict[str, str], start: str | None = None) -> str:
    """A task's accepted result commit: its checkout, its change, its commit."""
    wt = manager.create(repo, task, "main", start_commit=start)
    for name, content in files.items():
        (wt.path / name).write_text(content)
    sha = wt.commit(f"Task {task}", wt.changed_paths())
    manager.accept(wt, sha, sorted(files))
    manager.remove(wt, keep_branch=True)
    return sha


def test_a_cell_starts_at_the_given_commit_and_its_result_sits_on_it(repo, work_dir):
    manager = WorktreeManager(work_dir / "worktrees")
    a = result_of(manager, repo, "A", {"api.py": "def api(): return 1\n"})
    git(repo, "commit", "--quiet", "--allow-empty", "-m", "main moves on")  # the base branch moves meanwhile
    b_wt = manager.create(repo, "B", "main", start_commit=a)
    assert (b_wt.path / "api.py").read_text() == "def api(): return 1\n", "B sees A's result"
    assert b_wt.changed_paths() == [], "A's change is B's starting point, not part of B's change"
    (b_wt.path / "client.py").write_text("from api import api\n")
    b = b_wt.commit("Task B", b_wt.changed_paths())
    manager.accept(b_wt, b, ["client.py"])
    assert git(repo, "rev-parse", f"{b}^@") == a, "B's only parent is A's result commit"
    assert git(repo, "diff-tree", "-r", "--name-only", "--no-commit-id", a, b) == "client.py"
    # A commit on the base branch's tip (not the start commit) is refused.
    other = b_wt.cell_git("-c", "user.name=Agent", "-c", "user.email=agent@example.com", "commit-tree",
                          f"{b}^{{tree}}", "-p", git(repo, "rev-parse", "main"), "-m", "elsewhere")
    with pytest.raises(ResultRejected, match="commit the cell started from"):
        manager.accept(b_wt, other, ["client.py"])
    manager.remove(b_wt, keep_branch=True)


def test_a_start_commit_must_be_a_commit_sha_the_repository_holds(repo, work_dir):
    manager = WorktreeManager(work_dir / "worktrees")
    with pytest.raises(ConfigurationError, match="not a commit SHA"):
        manager.create(repo, "X", "main", start_commit="main")  # a name could move: SHAs only
    with pytest.raises(ConfigurationError, match="is not in"):
        manager.create(repo, "X", "main", start_commit="0" * 40)
    assert git(repo, "branch", "--list", "reactor/X") == ""


def test_several_results_are_merged_by_reactor_or_named_as_conflicting(repo, work_dir):
    manager = WorktreeManager(work_dir / "worktrees")
    left = result_of(manager, repo, "L", {"left.txt": "left\n"})
    right = result_of(manager, repo, "R", {"right.txt": "right\n"})
    third = result_of(manager, repo, "T", {"third.txt": "third\n"})
    refs_before = git(repo, "for-each-ref")
    merge = integrate(repo, [left, right], "integration")
    assert git(repo, "rev-parse", f"{merge}^@").split() == [left, right]
    assert git(repo, "ls-tree", "--name-only", merge).split() == ["calc.py", "left.txt", "right.txt", "test_calc.py"]
    assert git(repo, "log", "-1", "--format=%an <%ae>", merge) == "Reactor <reactor@localhost>"
    octopus = integrate(repo, [left, right, third], "integration")
    assert git(repo, "rev-parse", f"{octopus}^@").split() == [left, right, third]
    assert "third.txt" in git(repo, "ls-tree", "--name-only", octopus).split()
    assert integrate(repo, [left, left], "integration") == left, "one result is its own integration"
    assert git(repo, "for-each-ref") == refs_before, "integrating writes no ref"

    one = result_of(manager, repo, "C1", {"calc.py": "def add(a, b):\n    return a + b\n"})
    two = result_of(manager, repo, "C2", {"calc.py": "def add(a, b):\n    return b + a\n"})
    with pytest.raises(ParentsConflict, match="conflict in calc.py"):
        integrate(repo, [one, two], "integration")
    assert git(repo, "status", "--porcelain") == "", "the user's checkout is untouched"
    # The child starts at the merge: its result's parent is the merge commit.
    child = result_of(manager, repo, "D", {"child.txt": "child\n"}, start=merge)
    assert git(repo, "rev-parse", f"{child}^@") == merge
