"""Git worktrees for cells: one fresh branch per task, cut from the base branch.

The base branch and the user's checkout are never modified: a worktree gets its own branch
created at the base commit, and everything Reactor commits goes to that branch. Worktrees
live outside the user's checkout (so they never show up in its `git status`).

Git serialises worktree bookkeeping with lock files and fails, rather than waits, when two
commands collide. So every operation that changes a repository's worktree list or branches
holds a per-repository lock: a thread lock within this process plus an flock on a file in
the repository's git directory, which also serialises against another Reactor process.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from reactor.errors import ConfigurationError
from reactor.infra.git import GitError, git, git_ok
from reactor.infra.processes import Owner

DEFAULT_COMMITTER = {"name": "Reactor", "email": "reactor@localhost"}

_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


@dataclass
class Worktree:
    repo: Path  # the repository's top level (the user's checkout, or a mirror)
    path: Path
    branch: str
    base_branch: str
    base_commit: str
    slot: str  # the worktree directory's name (the task id, or namespace.name in the operator)
    owner: str  # the Owner token of the Reactor process that created it

    # -- operations on the worktree's own branch; none of these touch the base branch --

    def changed_paths(self) -> list[str]:
        """Paths that differ from the branch head, including untracked files (and both
        sides of a rename)."""
        out = git(self.path, "status", "--porcelain=v1", "-z", "--untracked-files=all", strip=False)
        entries = iter(e for e in out.split("\0") if e)
        paths = []
        for entry in entries:
            status, path = entry[:2], entry[3:]
            paths.append(path)
            if "R" in status or "C" in status:
                paths.append(next(entries, ""))  # -z puts the source path in its own entry
        return [p for p in paths if p]

    def commit(self, message: str, paths: list[str]) -> str:
        """Commit ``paths`` (added, changed or deleted) on the worktree's branch; return the
        commit SHA. Only those paths: files a test run left behind are not the change."""
        git(self.path, "add", "--all", "--", *paths)
        identity = []
        if not git(self.path, "config", "user.email", check=False):
            identity = ["-c", f"user.name={DEFAULT_COMMITTER['name']}", "-c", f"user.email={DEFAULT_COMMITTER['email']}"]
        # --no-verify: the task's test command is the gate; hooks may prompt or need a terminal.
        git(self.path, *identity, "commit", "--no-verify", "--quiet", "-m", message)
        return git(self.path, "rev-parse", "HEAD")

    def revert(self) -> None:
        """Throw away every change since the branch head (the RB strategy's rollback)."""
        git(self.path, "reset", "--hard", "--quiet", "HEAD")
        git(self.path, "clean", "-fdx", "--quiet")

    def head(self) -> str:
        return git(self.path, "rev-parse", "HEAD")


class WorktreeManager:
    """Creates and removes worktrees under ``root/<repo-key>/<task-id>``.

    A metadata file per worktree (``root/<repo-key>/.meta/<task-id>.json``) records what
    cleanup needs after a crash: the repository, branch, base commit and owning process.
    """

    def __init__(self, root: Path, owner: Owner | None = None):
        self.root = Path(root).expanduser().resolve()
        self.owner = owner or Owner.current()

    # -- public API --

    def create(self, repo: Path, task_id: str, base_branch: str = "main", branch: str | None = None,
               slot: str | None = None) -> Worktree:
        """``slot`` names the worktree's directory (default: the task id); the operator uses
        namespace.name, since task ids need only be unique per repository and namespace."""
        top = resolve_repository(repo)
        branch = branch or f"reactor/{task_id}"
        validate_branch_name(branch)
        path = self._repo_dir(top) / safe_component(slot or task_id)
        with repository_lock(top):
            base_commit = resolve_base_branch(top, base_branch)
            if git_ok(top, "show-ref", "--verify", "--quiet", f"refs/heads/{branch}"):
                raise ConfigurationError(
                    f"branch {branch!r} already exists in {top}: a task with this id ran before. "
                    "Choose another task id, or delete the branch if its result is no longer wanted."
                )
            if path.exists():
                raise ConfigurationError(
                    f"worktree path {path} already exists (left by a crashed run?); run `reactor cleanup --repo {top}`"
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            worktree = Worktree(top, path, branch, base_branch, base_commit, slot or task_id, self.owner.token)
            self._write_meta(worktree)
            try:
                git(top, "worktree", "add", "--quiet", "-b", branch, str(path), base_commit)
            except GitError:
                self._meta_path(worktree).unlink(missing_ok=True)
                raise
        return worktree

    def remove(self, worktree: Worktree, *, keep_branch: bool) -> None:
        """Remove the worktree; delete its branch unless asked to keep it (a committed result).

        Safe to call twice and after a partial create."""
        with repository_lock(worktree.repo):
            if worktree.path.exists():
                git(worktree.repo, "worktree", "remove", "--force", "--force", str(worktree.path), check=False)
                shutil.rmtree(worktree.path, ignore_errors=True)
            git(worktree.repo, "worktree", "prune", check=False)
            if not keep_branch and git_ok(worktree.repo, "show-ref", "--verify", "--quiet", f"refs/heads/{worktree.branch}"):
                git(worktree.repo, "branch", "--quiet", "-D", worktree.branch, check=False)
            self._meta_path(worktree).unlink(missing_ok=True)

    def cleanup(self, repo: Path) -> list[Worktree]:
        """Remove what crashed runs left: their worktrees, and their branches when those hold
        no commit of their own (a branch with a commit is a result and is kept)."""
        top = resolve_repository(repo)
        removed = [w for w in self._recorded(top) if not Owner.is_alive_token(w.owner)]
        for worktree in removed:
            self.discard(worktree)
        with repository_lock(top):  # also entries git still lists for directories already gone
            git(top, "worktree", "prune", check=False)
        return removed

    def discard(self, worktree: Worktree) -> None:
        """Remove a worktree found after the fact; keep its branch only if it holds a commit."""
        has_own_commits = (
            git_ok(worktree.repo, "show-ref", "--verify", "--quiet", f"refs/heads/{worktree.branch}")
            and git(worktree.repo, "rev-parse", worktree.branch, check=False) != worktree.base_commit
        )
        self.remove(worktree, keep_branch=has_own_commits)

    def remove_slot(self, slot: str) -> list[Worktree]:
        """Discard the worktrees recorded under ``slot`` in any repository (a deleted task's)."""
        found = [w for repo in self.recorded_repositories() for w in self._recorded(repo) if w.slot == slot]
        for worktree in found:
            self.discard(worktree)
        return found

    def recorded_repositories(self) -> list[Path]:
        """Repositories that have worktrees recorded under this root."""
        repos = set()
        for meta in self.root.glob("*/.meta/*.json"):
            try:
                repos.add(Path(json.loads(meta.read_text())["repo"]))
            except (OSError, ValueError, KeyError):
                continue
        return sorted(repos)

    # -- internals --

    def _repo_dir(self, top: Path) -> Path:
        return self.root / repository_key(top)

    def _meta_path(self, worktree: Worktree) -> Path:
        return self._repo_dir(worktree.repo) / ".meta" / f"{safe_component(worktree.slot)}.json"

    def _write_meta(self, worktree: Worktree) -> None:
        meta = self._meta_path(worktree)
        meta.parent.mkdir(parents=True, exist_ok=True)
        record = {k: str(v) for k, v in asdict(worktree).items()}
        tmp = meta.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, meta)

    def _recorded(self, top: Path) -> Iterator[Worktree]:
        meta_dir = self._repo_dir(top) / ".meta"
        for meta in sorted(meta_dir.glob("*.json")) if meta_dir.is_dir() else []:
            try:
                record = json.loads(meta.read_text())
                yield Worktree(
                    repo=Path(record["repo"]),
                    path=Path(record["path"]),
                    branch=record["branch"],
                    base_branch=record["base_branch"],
                    base_commit=record["base_commit"],
                    slot=record["slot"],
                    owner=record["owner"],
                )
            except (OSError, ValueError, KeyError):
                continue


def resolve_repository(repo: Path | str) -> Path:
    """The top level of the git repository at ``repo``, or a clear error."""
    repo = Path(repo).expanduser()
    if not repo.is_dir():
        raise ConfigurationError(f"repository {repo} does not exist or is not a directory")
    if not git_ok(repo, "rev-parse", "--git-dir"):
        raise ConfigurationError(f"{repo} is not a git repository")
    if git(repo, "rev-parse", "--is-bare-repository") == "true":
        return Path(git(repo, "rev-parse", "--absolute-git-dir")).resolve()
    return Path(git(repo, "rev-parse", "--show-toplevel")).resolve()


def resolve_base_branch(top: Path, base_branch: str) -> str:
    sha = git(top, "rev-parse", "--verify", "--quiet", f"refs/heads/{base_branch}^{{commit}}", check=False)
    if not sha:
        branches = git(top, "for-each-ref", "--format=%(refname:short)", "refs/heads", check=False).split()
        known = ", ".join(branches) if branches else "none: the repository has no commits"
        raise ConfigurationError(f"base branch {base_branch!r} does not exist in {top} (branches: {known})")
    return sha


def validate_branch_name(branch: str) -> None:
    if not branch or not git_ok(".", "check-ref-format", "--branch", branch):
        raise ConfigurationError(f"{branch!r} is not a valid git branch name")


def repository_key(top: Path) -> str:
    digest = hashlib.sha256(str(top).encode()).hexdigest()[:10]
    return f"{safe_component(top.name)}-{digest}"


@contextmanager
def repository_lock(top: Path) -> Iterator[None]:
    """Serialise worktree/branch bookkeeping on one repository, across threads and processes."""
    git_dir = Path(git(top, "rev-parse", "--git-common-dir"))
    if not git_dir.is_absolute():
        git_dir = top / git_dir
    with file_lock(git_dir / "reactor.lock"):
        yield


@contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive lock named by a file: a thread lock (flock is per process) plus flock."""
    key = str(lock_path)
    with _thread_locks_guard:
        lock = _thread_locks.setdefault(key, threading.Lock())
    with lock, open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def safe_component(text: str) -> str:
    """A path component from a task id or repository name (no separators, no dot-files)."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in text).lstrip(".")
    return cleaned or "_"
