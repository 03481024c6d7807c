"""Repositories, results and drivers for merge-queue tests and the benchmark.

A queue repository is a bare repository (an origin) holding a small Python project whose
test command, ``python3 -B run_tests.py``, imports every module and calls its ``check()``;
a result is one commit on a base commit, made with git plumbing (no checkout), on the
branch ``reactor/<id>`` as a cell's result would be.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from reactor.infra.confinement import Confinement, ConfinementSettings
from reactor.mergequeue import ConfinedTests, FileStore, LocalBranch, MergeQueue, QueueEvent

TEST_COMMAND = "python3 -B run_tests.py"
RUN_TESTS = textwrap.dedent('''\
    import importlib, pathlib, sys, traceback
    sys.path.insert(0, ".")
    failed = 0
    for path in sorted(pathlib.Path(".").glob("*.py")):
        if path.stem == "run_tests":
            continue
        try:
            module = importlib.import_module(path.stem)
            if hasattr(module, "check"):
                module.check()
        except Exception:
            failed += 1
            print(f"FAIL {path.stem}:")
            traceback.print_exc(file=sys.stdout)
    print(f"{failed} failed")
    sys.exit(1 if failed else 0)
''')


def git(cwd: Path, *args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True, input=stdin,
                          env={**os.environ, **(env or {})}).stdout.strip()


def make_queue_repo(path: Path, files: dict[str, str]) -> Path:
    """A bare repository whose ``main`` holds ``files`` and the test runner."""
    path.mkdir(parents=True)
    git(path, "init", "--quiet", "--bare", "--initial-branch=main")
    git(path, "config", "user.name", "Dev")
    git(path, "config", "user.email", "dev@example.com")
    commit = commit_files(path, None, {"run_tests.py": RUN_TESTS, **files}, "initial")
    git(path, "update-ref", "refs/heads/main", commit)
    return path


def commit_files(repo: Path, parent: str | None, changes: dict[str, str | None], message: str) -> str:
    """A commit on ``parent`` with ``changes`` (None deletes a file), made without a checkout."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        if parent:
            git(repo, "read-tree", parent, env=env)
        for name, content in changes.items():
            if content is None:
                git(repo, "update-index", "--force-remove", name, env=env)
            else:
                blob = git(repo, "hash-object", "-w", "--stdin", stdin=content)
                git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{name}", env=env)
        tree = git(repo, "write-tree", env=env)
    return git(repo, "commit-tree", tree, *(["-p", parent] if parent else []), "-m", message)


def make_result(repo: Path, entry_id: str, changes: dict[str, str | None], base: str = "main") -> tuple[str, str]:
    """A green result as a cell leaves it: one commit on the base tip, on ``reactor/<id>``.
    Returns (commit, base commit)."""
    base_commit = git(repo, "rev-parse", base)
    commit = commit_files(repo, base_commit, changes, f"Task {entry_id}: change")
    git(repo, "update-ref", f"refs/heads/reactor/{entry_id}", commit)
    return commit, base_commit


def module(name: str, body: str = "") -> str:
    """A module whose check() passes (unless ``body`` makes it fail)."""
    return f"def check():\n    assert {name!r}\n{textwrap.indent(textwrap.dedent(body), '    ')}\n"


def base_history(repo: Path, branch: str = "main") -> list[str]:
    return git(repo, "rev-list", "--reverse", branch).split()


def failing_commits(repo: Path, commits: list[str], command: str = TEST_COMMAND) -> list[str]:
    """Commits on which ``command`` fails, each checked out afresh (the test's own check)."""
    failing = []
    with tempfile.TemporaryDirectory() as tmp:
        checkout = Path(tmp) / "c"
        git(Path(tmp), "clone", "--quiet", "--shared", "--no-checkout", str(repo), str(checkout))
        for commit in commits:
            git(checkout, "checkout", "--quiet", "--force", "--detach", commit)
            git(checkout, "clean", "-fdxq")
            if subprocess.run(["bash", "-c", command], cwd=checkout, capture_output=True).returncode:
                failing.append(commit)
    return failing


def confined_tests(work_dir: Path) -> ConfinedTests:
    """The test runner as the engine confines it (no opencode needed)."""
    import reactor
    confinement = Confinement(ConfinementSettings(), work_dir, shared_read=[Path(reactor.__file__).parent])
    return ConfinedTests(confinement, work_dir)


def drive_until_killed(state_file: str, work_dir: str, crash_at: str) -> None:
    """Drain a stored queue, SIGKILLing this process when the queue reports ``crash_at``
    (e.g. ``advancing``: the record says so, the swap is next; ``advanced``: the swap is
    made, the record not yet updated). The crash tests run it as a subprocess."""
    store = FileStore(Path(state_file))
    stored = store.load()
    assert stored is not None

    def on_event(event: QueueEvent) -> None:
        if event.kind == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)

    queue = MergeQueue(store, LocalBranch(Path(stored.config.repo), stored.config.base_branch),
                       confined_tests(Path(work_dir)), on_event=on_event)
    asyncio.run(queue.drain())


if __name__ == "__main__":
    drive_until_killed(*sys.argv[1:4])
