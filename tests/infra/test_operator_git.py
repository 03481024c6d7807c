"""The operator's git reads no global or system config: a filter, hook or alias in the
operator's ~/.gitconfig (where a cell's planted link once could append one) never runs.
Real git; the end-to-end path through `reactor run` is tests/security/test_planted.py."""

from __future__ import annotations

from pathlib import Path

from reactor.infra.git import git
from reactor.infra.worktrees import WorktreeManager, committer_identity
from reactor_dev.testing.hostile import hostile_git_config
from reactor_dev.testing.repos import make_repo


def test_a_hostile_global_config_never_runs_in_the_operators_git(tmp_path, monkeypatch):
    repo = make_repo(tmp_path / "repo")
    ran = tmp_path / "ran"
    home = hostile_git_config(tmp_path / "home", ran)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(home / ".gitconfig"))
    # Config through the environment is config too.
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    monkeypatch.setenv("GIT_CONFIG_KEY_0", "core.pager")
    monkeypatch.setenv("GIT_CONFIG_VALUE_0", f"touch {ran}-env; cat")
    manager = WorktreeManager(tmp_path / "work")

    worktree = manager.create(repo, "T")  # clone + checkout: smudge filters would run here
    (worktree.path / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    commit = worktree.commit("fix", ["calc.py"])  # clean filter
    manager.accept(worktree, commit, ["calc.py"])
    git(repo, "log", "--oneline", "-1", "reactor/T")
    git(repo, "status")

    assert not ran.exists() and not Path(f"{ran}-env").exists(), "nothing of the global config ran"
    assert git(repo, "show", "reactor/T:calc.py") == "def add(a, b):\n    return a + b"
    assert git(repo, "config", "--get-regexp", "^filter", check=False) == "", "the operator's git sees no global filter"


def test_the_users_identity_still_names_the_result(tmp_path, monkeypatch):
    """Read as values from the user's global config (the repository sets none)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text("[user]\n\tname = Ada\n\temail = ada@example.com\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("GIT_CONFIG_GLOBAL", raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    repo = make_repo(tmp_path / "repo")
    git(repo, "config", "--unset", "user.name")
    git(repo, "config", "--unset", "user.email")
    assert committer_identity(repo) == {"name": "Ada", "email": "ada@example.com"}
