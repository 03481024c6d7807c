"""Shared fixtures: real git repositories, an engine with its own work dir, leak checks."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from reactor.infra.processes import find_marked_processes

pytest_plugins = ["reactor.testing.kube_fixtures"]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


BUGGY_CALC = textwrap.dedent('''\
    def add(a, b):
        return a - b
''')
FIXED_CALC = textwrap.dedent('''\
    def add(a, b):
        return a + b
''')
TEST_CALC = textwrap.dedent('''\
    from calc import add


    def test_add():
        assert add(2, 3) == 5
''')


def make_repo(path: Path, files: dict[str, str] | None = None, branch: str = "main") -> Path:
    """A real git repository with one commit on ``branch``. Default content: a Python module
    with a bug and the test that catches it."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "--quiet", f"--initial-branch={branch}")
    git(path, "config", "user.email", "dev@example.com")
    git(path, "config", "user.name", "Dev")
    for name, content in (files or {"calc.py": BUGGY_CALC, "test_calc.py": TEST_CALC}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(content)
    git(path, "add", "--all")
    git(path, "commit", "--quiet", "-m", "initial")
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo")


def worktrees_of(repo: Path) -> list[str]:
    out = git(repo, "worktree", "list", "--porcelain")
    return [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("worktree ")][1:]


@pytest.fixture
def work_dir(tmp_path: Path):
    """A work dir of our own; afterwards no server that any test started under it may live."""
    path = tmp_path / "work"
    path.mkdir()
    yield path
    leaked = find_marked_processes(str(path.resolve()))
    for proc in leaked:  # end them so one failure does not cascade, then fail the test
        os.killpg(proc.pid, 9)
    assert not leaked, f"servers left running: {leaked}"
