"""Small real git repositories for tests, benchmarks and the demo: by default a Python
module with a bug and the test that catches it (an agent's fix makes it pass)."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

BUGGY_CALC = textwrap.dedent('''\
    def add(a, b):
        return a - b
''')
TEST_CALC = textwrap.dedent('''\
    from calc import add


    def test_add():
        assert add(2, 3) == 5
''')


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def make_repo(path: Path, files: dict[str, str] | None = None, branch: str = "main") -> Path:
    """A repository with one commit on ``branch`` (default content: calc.py with a bug and test_calc.py)."""
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


def worktrees_of(repo: Path, work_dir: Path) -> list[str]:
    """Cell checkouts of ``repo`` under ``work_dir``: clones that borrow its objects."""
    objects = (repo / git(repo, "rev-parse", "--git-common-dir") / "objects").resolve()
    return sorted(str(alternates.parents[3]) for alternates in Path(work_dir).glob("worktrees/*/*/.git/objects/info/alternates")
                  if Path(alternates.read_text().strip()).resolve() == objects)
