"""Checkouts for cells: one fresh branch per task, cut from the base branch (or from a given
start commit: a task that builds on other tasks' results starts at their result commit, or
at Reactor's merge of several, see ``integrate``).

A cell's checkout is a clone of the source repository (the user's repository in
`reactor run`, the operator's mirror) that borrows its objects read-only through
`objects/info/alternates` (`git clone --shared`), not a linked worktree: a linked worktree
keeps its index, HEAD and refs in the source's git dir and writes objects into it, so a
confined cell could not use git, and an unconfined one could write the source's hooks,
config and every branch. In a clone every git write stays inside the cell.

The base branch and the user's checkout are never modified. The agent's change comes back
as exactly one commit, made by Reactor (confined, in the cell), fetched by its SHA into the
source repository through a confined `git upload-pack`, checked (its only parent is the
commit the cell started from, it changes exactly the tested paths) and only then named by the result branch.

Git serialises ref bookkeeping with lock files and fails, rather than waits, when two
commands collide. So every operation that changes a source repository's refs holds a
per-repository lock: a thread lock within this process plus an flock on a file in the
repository's git directory, which also serialises against another Reactor process.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

from reactor.errors import ConfigurationError, ReactorError
from reactor.infra import launcher
from reactor.infra.git import (DEFAULT_CELL_GIT_DEADLINE, GitError, cell_git_env, git, git_command, git_in_cell, git_ok,
                               git_status, kill_tree)
from reactor.infra.processes import Owner
from reactor.infra.refledger import RefLedger
from reactor.infra.safefs import read_regular

DEFAULT_COMMITTER = {"name": "Reactor", "email": "reactor@localhost"}
# Git inside a cell reads no global or system configuration.
_CELL_GIT_ENV = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null"}

_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


class ResultRejected(ReactorError):
    """The cell's result does not hold up (refs moved behind Reactor's back, or the commit
    is not the single tested change on the commit the cell started from)."""


class ParentsConflict(ReactorError):
    """The results a task builds on cannot be merged without a conflict."""


@dataclass
class Worktree:
    repo: Path  # the source repository's top level (the user's checkout, or a mirror)
    path: Path  # the cell's checkout (a clone with alternates)
    branch: str
    base_branch: str
    # The commit the cell started from: the base branch's tip when the cell was created, or
    # the start commit it was given. The result must be exactly one commit on it.
    base_commit: str
    slot: str  # the checkout directory's name (the task id, or namespace.name.uid in the operator)
    owner: str  # the Owner token of the Reactor process that created it
    identity: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_COMMITTER))
    # The launcher policy git in the checkout runs under (None: unconfined); set by confine().
    policy: dict | None = field(default=None, repr=False, compare=False)
    in_cell: bool = field(default=False, repr=False, compare=False)
    # Each git step in the checkout is killed, with all it started, after this many seconds.
    git_deadline: float = field(default=DEFAULT_CELL_GIT_DEADLINE, repr=False, compare=False)
    # Git commands running in the checkout now (threads run them): killed with the cell.
    running: set = field(default_factory=set, repr=False, compare=False)

    def confine(self, policy: dict | None, git_deadline: float | None = None) -> None:
        """From now on git in the checkout runs in the cell, under the cell launcher: the
        checkout's config, attributes and hooks were written by the cell. ``policy``: the
        cell's (with no TCP at all: git here needs none), None when cells run unconfined."""
        self.policy, self.in_cell = policy, True
        if git_deadline is not None:
            self.git_deadline = git_deadline

    def cell_git(self, *args: str, check: bool = True, strip: bool = True, deadline: float | None = None) -> str:
        """Git in the checkout, in the cell once it is confined. ``deadline`` (seconds): this
        step's, instead of ``git_deadline``; past it the step and what it started (a filter
        the cell planted) are killed: GitTimeout."""
        if not self.in_cell:  # the checkout Reactor just made, before any cell has written to it
            return git(self.path, *args, check=check, strip=strip, env=_CELL_GIT_ENV, timeout=deadline,
                       track=self.running)
        # A deadline already past still runs the step, killed at once (GitTimeout), never unbounded.
        step = self.git_deadline if deadline is None else max(min(deadline, self.git_deadline), 0.001)
        return git_in_cell(self.path, *args, policy=self.policy, env=_CELL_GIT_ENV, check=check, strip=strip,
                           deadline=step, track=self.running)

    def kill_running(self) -> None:
        """Kill the git commands running in the checkout and what they started (the task is
        cancelled or torn down while a thread waits on one)."""
        for proc in list(self.running):
            kill_tree(proc)

    # -- operations on the checkout; none of these touch the source repository --

    def _rebase_index(self, until: float | None = None) -> None:
        """Point HEAD at the task's branch on the base commit and reset the index to it,
        keeping the files: whatever the agent did with branches, commits or index flags,
        `status` then shows everything that differs from the base commit."""
        self.cell_git("update-ref", f"refs/heads/{self.branch}", self.base_commit, deadline=_left(until))
        self.cell_git("symbolic-ref", "HEAD", f"refs/heads/{self.branch}", deadline=_left(until))
        self.cell_git("read-tree", self.base_commit, deadline=_left(until))

    # ``until`` below (time.monotonic()): every git step of the operation ends by then.

    def changed_paths(self, until: float | None = None) -> list[str]:
        """Paths that differ from the base commit, including untracked files (and both
        sides of a rename)."""
        self._rebase_index(until)
        out = self.cell_git("status", "--porcelain=v1", "-z", "--untracked-files=all", strip=False,
                            deadline=_left(until))
        entries = iter(e for e in out.split("\0") if e)
        paths = []
        for entry in entries:
            status, path = entry[:2], entry[3:]
            paths.append(path)
            if "R" in status or "C" in status:
                paths.append(next(entries, ""))  # -z puts the source path in its own entry
        return [p for p in paths if p]

    def commit(self, message: str, paths: list[str], until: float | None = None) -> str:
        """Commit ``paths`` (added, changed or deleted) on the base commit; return the commit
        SHA. Only those paths: files a test run left behind are not the change."""
        self._rebase_index(until)
        self.cell_git("add", "--all", "--", *paths, deadline=_left(until))
        self.cell_git("-c", f"user.name={self.identity['name']}", "-c", f"user.email={self.identity['email']}",
                      "commit", "--no-verify", "--quiet", "-m", message, deadline=_left(until))
        return self.cell_git("rev-parse", "HEAD", deadline=_left(until))

    def lay_files(self, commit: str) -> None:
        """Make the checkout's files those of ``commit`` (borrowed from the source's objects),
        before the agent starts; what differs from the base commit is then the change."""
        self.cell_git("read-tree", "-u", "--reset", commit)

    def revert(self, until: float | None = None) -> None:
        """Throw away every change since the base commit (the RB strategy's rollback)."""
        self._rebase_index(until)
        self.cell_git("reset", "--hard", "--quiet", self.base_commit, deadline=_left(until))
        self.cell_git("clean", "-fdx", "--quiet", deadline=_left(until))

    def snapshot(self, paths: list[str]) -> dict[str, str | None]:
        """What each path holds now (a content hash, a link's target, or None when absent),
        read without following links: to prove later that nothing changed it."""
        found: dict[str, str | None] = {}
        for path in paths:
            full = self.path / path
            try:
                if full.is_symlink():
                    found[path] = "link:" + os.readlink(full)
                    continue
                fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                found[path] = None
                continue
            digest = hashlib.sha256()
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    found[path] = "not-a-file"
                    continue
                while chunk := os.read(fd, 1 << 20):
                    digest.update(chunk)
            finally:
                os.close(fd)
            found[path] = digest.hexdigest()
        return found

    def changed_since(self, snapshot: dict[str, str | None]) -> list[str]:
        """Paths of ``snapshot`` that no longer hold what they held then."""
        now = self.snapshot(list(snapshot))
        return [path for path in snapshot if now[path] != snapshot[path]]

    @property
    def source_objects(self) -> Path:
        """The source repository's object store, which the checkout borrows (read-only)."""
        return git_common_dir(self.repo) / "objects"


class WorktreeManager:
    """Creates and removes cell checkouts under ``root/<repo-key>/<slot>``.

    A metadata file per checkout (``root/<repo-key>/.meta/<slot>.json``) records what
    cleanup needs after a crash: the repository, branch, base commit and owning process.
    """

    def __init__(self, root: Path, owner: Owner | None = None):
        self.root = Path(root).expanduser().resolve()
        self.owner = owner or Owner.current()

    # -- public API --

    def create(self, repo: Path, task_id: str, base_branch: str = "main", branch: str | None = None,
               slot: str | None = None, start_commit: str | None = None) -> Worktree:
        """``slot`` names the checkout's directory (default: the task id); the operator uses
        namespace.name.uid, since task ids need only be unique per repository and namespace.
        ``start_commit``: start there instead of at the base branch's tip (a commit the
        repository holds: another task's result)."""
        top = resolve_repository(repo)
        branch = branch or f"reactor/{task_id}"
        validate_branch_name(branch)
        path = self._repo_dir(top) / safe_component(slot or task_id)
        with repository_lock(top):
            base_commit = (resolve_commit(top, start_commit) if start_commit is not None
                           else resolve_base_branch(top, base_branch))
            if git_ok(top, "show-ref", "--verify", "--quiet", f"refs/heads/{branch}"):
                raise ConfigurationError(
                    f"branch {branch!r} already exists in {top}: a task with this id ran before. "
                    "Choose another task id, or delete the branch if its result is no longer wanted."
                )
            if path.exists():
                raise ConfigurationError(
                    f"checkout {path} already exists (left by a crashed run?); run `reactor cleanup --repo {top}`"
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            worktree = Worktree(top, path, branch, base_branch, base_commit, slot or task_id, self.owner.token,
                                identity=committer_identity(top))
            self._write_meta(worktree)
        try:
            # The source is trusted and the checkout is new: no cell has written anything yet.
            git(path.parent, "clone", "--quiet", "--shared", "--no-checkout", str(top), str(path))
            git(path, "checkout", "--quiet", "-b", branch, base_commit)
        except GitError:
            shutil.rmtree(path, ignore_errors=True)
            self._meta_path(worktree).unlink(missing_ok=True)
            raise
        return worktree

    def accept(self, worktree: Worktree, commit: str, tested_paths: list[str], until: float | None = None) -> None:
        """Bring the cell's result commit into the source repository as the result branch.

        The commit is fetched by SHA through `git upload-pack` run confined in the cell (it
        reads the cell's config), objects checked (fsck); it must have the commit the cell started
        from as its only parent, change only tested paths, and hold the files as they are in the
        checkout. Refs moved behind Reactor's back are restored first. Raises ResultRejected.
        ``until`` (time.monotonic()) bounds the fetch, the one step that runs the cell's git."""
        top = worktree.repo
        incoming = f"refs/reactor/incoming/{safe_component(worktree.slot)}"
        # git runs upload-pack through a shell, with the checkout's path appended: the
        # launcher's config descriptor is inherited through git and that shell.
        launch = launcher.prepare(git_command("-c", "uploadpack.allowAnySHA1InWant=true", "upload-pack"),
                                  cell_git_env(_CELL_GIT_ENV), worktree.policy,
                                  deadline=max(min(worktree.git_deadline, _left(until) or worktree.git_deadline), 0.001),
                                  term_grace=0.0, pass_env=("GIT_PROTOCOL",))
        upload_pack = shlex.join(launch.argv)
        with contextlib.closing(launch), repository_lock(top):
            ledger = RefLedger(git_common_dir(top))
            tampered = ledger.restore_tampered(ignore={incoming})
            if tampered:
                raise ResultRejected("refs changed outside the task's branch; restored: " + "; ".join(tampered))
            git(top, "-c", "transfer.fsckObjects=true", "fetch", "--quiet", "--no-tags", "--no-write-fetch-head",
                f"--upload-pack={upload_pack}", str(worktree.path), f"+{commit}:{incoming}",
                env=_CELL_GIT_ENV, inherit_env=False, pass_fds=launch.pass_fds,
                timeout=_left(until), track=worktree.running)
            try:
                self._check_result(worktree, commit, tested_paths)
                git(top, "update-ref", f"refs/heads/{worktree.branch}", commit, "")
                ledger.record(f"refs/heads/{worktree.branch}", commit)
            finally:
                git(top, "update-ref", "-d", incoming, check=False)

    @staticmethod
    def _check_result(worktree: Worktree, commit: str, tested_paths: list[str]) -> None:
        top = worktree.repo
        parents = git(top, "rev-list", "--parents", "-n", "1", commit).split()[1:]
        if parents != [worktree.base_commit]:
            raise ResultRejected(f"result commit {commit[:12]} is not a single commit on the commit the cell "
                                 f"started from, {worktree.base_commit[:12]} (parents: {', '.join(p[:12] for p in parents) or 'none'})")
        out = git(top, "diff-tree", "-r", "-z", "--no-renames", "--no-commit-id", worktree.base_commit, commit, strip=False)
        fields = [f for f in out.split("\0") if f]
        untested = []
        for meta, path in zip(fields[0::2], fields[1::2]):
            blob, status = meta.split()[3], meta.split()[4]
            if path not in tested_paths:
                untested.append(path)
            elif status != "D":
                # Read without following links: the checkout is the cell's.
                content = read_regular(worktree.path, path)
                actual = git(top, "hash-object", "--no-filters", "--stdin", stdin=content) if content is not None else None
                if actual is not None and actual != blob:
                    untested.append(f"{path} (committed content differs from the tested file)")
        if untested:
            raise ResultRejected(f"result commit {commit[:12]} holds changes that were not tested: {', '.join(untested)}")

    def remove(self, worktree: Worktree, *, keep_branch: bool) -> None:
        """Remove the checkout; delete its result branch unless asked to keep it (a committed
        result). Safe to call twice and after a partial create."""
        shutil.rmtree(worktree.path, ignore_errors=True)
        with repository_lock(worktree.repo):
            ref = f"refs/heads/{worktree.branch}"
            if not keep_branch and git_ok(worktree.repo, "show-ref", "--verify", "--quiet", ref):
                git(worktree.repo, "update-ref", "-d", ref, check=False)
                RefLedger(git_common_dir(worktree.repo)).record(ref, None)
            self._meta_path(worktree).unlink(missing_ok=True)

    def cleanup(self, repo: Path, keep: frozenset[str] = frozenset()) -> list[Worktree]:
        """Remove what crashed runs left: their worktrees, and their branches when those hold
        no commit of their own (a branch with a commit is a result and is kept). Checkouts of
        the slots in ``keep`` stay (cells to be resumed)."""
        top = resolve_repository(repo)
        removed = [w for w in self._recorded(top) if not Owner.is_alive_token(w.owner) and w.slot not in keep]
        for worktree in removed:
            self.discard(worktree)
        return removed

    def discard(self, worktree: Worktree) -> None:
        """Remove a worktree found after the fact; keep its branch only if it holds a commit."""
        has_own_commits = (
            git_ok(worktree.repo, "show-ref", "--verify", "--quiet", f"refs/heads/{worktree.branch}")
            and git(worktree.repo, "rev-parse", worktree.branch, check=False) != worktree.base_commit
        )
        self.remove(worktree, keep_branch=has_own_commits)

    def adopt(self, slot: str) -> Worktree | None:
        """Take over the checkout recorded under ``slot`` that a process now dead left (an
        operator killed mid-task): it becomes this process's, as it is. None when there is
        none. Only Reactor's own record is read; the checkout itself (cell-written) is not
        touched here: git in it runs confined once the cell is (Worktree.confine)."""
        for repo in self.recorded_repositories():
            for worktree in self._recorded(repo):
                if worktree.slot != slot or (Owner.is_alive_token(worktree.owner) and worktree.owner != self.owner.token):
                    continue
                if not worktree.path.is_dir() or worktree.path.is_symlink():
                    continue
                with repository_lock(worktree.repo):
                    worktree.owner = self.owner.token
                    self._write_meta(worktree)
                return worktree
        return None

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
        record = {f.name: dict(v) if isinstance(v := getattr(worktree, f.name), dict) else str(v)
                  for f in fields(worktree) if f.name not in ("policy", "in_cell", "git_deadline", "running")}
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
                    identity=record.get("identity") or dict(DEFAULT_COMMITTER),
                )
            except (OSError, ValueError, KeyError):
                continue


def _left(until: float | None) -> float | None:
    """Seconds from now to ``until`` (time.monotonic()), for a step's deadline."""
    return None if until is None else until - time.monotonic()


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


def resolve_commit(top: Path, commit: str) -> str:
    """The full SHA of ``commit`` (a hex object name, nothing git would resolve otherwise),
    which must be a commit the repository holds."""
    if not (4 <= len(commit) <= 64) or any(c not in "0123456789abcdefABCDEF" for c in commit):
        raise ConfigurationError(f"start commit {commit!r} is not a commit SHA")
    sha = git(top, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}", check=False)
    if not sha:
        raise ConfigurationError(f"start commit {commit[:12]} is not in {top}: was its branch deleted "
                                 "before it was fetched?")
    return sha


INTEGRATION_IDENTITY = {"name": "Reactor", "email": "reactor@localhost"}


def integrate(repo: Path, commits: list[str], message: str) -> str:
    """The commit a task with several parents starts from: one merge commit of ``commits``
    (their result commits, in order) made by Reactor, never by an agent. One commit is its
    own integration. Raises ParentsConflict when they do not merge cleanly.

    No checkout is needed: `git merge-tree --write-tree` merges in the object store of the
    source repository (the operator's mirror), writing objects but no ref, index or file. A
    bare repository reads no `.gitattributes` from the merged trees (so no merge driver or
    filter named by a cell's file runs), its config is Reactor's, and git runs hardened."""
    top = resolve_repository(repo)
    shas = [resolve_commit(top, c) for c in commits]
    if not shas:
        raise ValueError("integrate: no commits")
    unique = list(dict.fromkeys(shas))
    if len(unique) == 1:
        return unique[0]
    env = {"GIT_AUTHOR_NAME": INTEGRATION_IDENTITY["name"], "GIT_AUTHOR_EMAIL": INTEGRATION_IDENTITY["email"],
           "GIT_COMMITTER_NAME": INTEGRATION_IDENTITY["name"], "GIT_COMMITTER_EMAIL": INTEGRATION_IDENTITY["email"]}
    with repository_lock(top):
        merged = unique[0]
        tree = git(top, "rev-parse", f"{merged}^{{tree}}")
        for other in unique[1:]:
            # Hardened, as every git of the operator: no global config (a merge driver there).
            proc = git_status(top, "merge-tree", "--write-tree", "--name-only", "--no-messages", merged, other)
            if proc.returncode == 1:  # conflicts: the tree OID, then the conflicted paths
                paths = [line for line in proc.stdout.splitlines()[1:] if line]
                raise ParentsConflict(f"the results of {', '.join(c[:12] for c in unique)} conflict in "
                                      f"{', '.join(sorted(set(paths))[:10]) or 'their histories'}")
            if proc.returncode != 0:
                raise GitError(["merge-tree", merged, other], proc.returncode, proc.stderr)
            tree = proc.stdout.splitlines()[0].strip()
            # An intermediate commit only to merge the next parent into (left unreferenced).
            merged = git(top, "commit-tree", tree, "-p", merged, "-p", other, "-m", message, env=env)
        if len(unique) == 2:
            return merged
        parents = [arg for sha in unique for arg in ("-p", sha)]
        return git(top, "commit-tree", tree, *parents, "-m", message, env=env)


def validate_branch_name(branch: str) -> None:
    if not branch or not git_ok(".", "check-ref-format", "--branch", branch):
        raise ConfigurationError(f"{branch!r} is not a valid git branch name")


def repository_key(top: Path) -> str:
    digest = hashlib.sha256(str(top).encode()).hexdigest()[:10]
    return f"{safe_component(top.name)}-{digest}"


def git_common_dir(top: Path) -> Path:
    git_dir = Path(git(top, "rev-parse", "--git-common-dir"))
    return (git_dir if git_dir.is_absolute() else top / git_dir).resolve()


def committer_identity(top: Path) -> dict[str, str]:
    """The user's identity as the source repository sees it, else as the user's global git
    config says (values only: the operator's git runs never load that file), else Reactor's."""
    for source in ((), *(("--file", str(f)) for f in user_global_configs())):
        name = git(top, "config", *source, "user.name", check=False)
        email = git(top, "config", *source, "user.email", check=False)
        if name and email:
            return {"name": name, "email": email}
    return dict(DEFAULT_COMMITTER)


def user_global_configs() -> list[Path]:
    """The files git would read as the user's global config."""
    explicit = os.environ.get("GIT_CONFIG_GLOBAL")
    if explicit:
        return [Path(explicit)] if explicit != os.devnull else []
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return [p for p in (Path(xdg) / "git" / "config", Path(os.path.expanduser("~/.gitconfig"))) if p.is_file()]


@contextmanager
def repository_lock(top: Path) -> Iterator[None]:
    """Serialise ref bookkeeping on one repository, across threads and processes."""
    with file_lock(git_common_dir(top) / "reactor.lock"):
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
