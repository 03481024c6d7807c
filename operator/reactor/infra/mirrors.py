"""Repository mirrors for the operator: one bare clone per namespace and repository URL in
the work dir, fetched before each task; worktrees are cut from it and result branches pushed
from it. Per namespace: a mirror holds unpushed results and their branch names, which are
no other tenant's business, even on the same URL.

Credentials never appear in argv, URLs, files or logs: https passwords reach git through an
askpass script reading environment variables, ssh keys through an anonymous in-memory file
(memfd) that ssh opens as /dev/fd/N. Every URL passes the RepositoryPolicy before git sees
it (no credentials in it; file:// only where allowed, never into the work dir).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from reactor.infra import private
from reactor.infra.git import GitError, git
from reactor.infra.refledger import RefLedger
from reactor.infra.repository_urls import RepositoryPolicy, RepositoryRefused, redact_url  # noqa: F401 (re-exported)
from reactor.infra.worktrees import ResultRejected, file_lock, repository_lock, safe_component

log = logging.getLogger(__name__)
# A clone or fetch whose caller gives no deadline (the merge queue's), and every push, ends
# after this many seconds: a remote that never answers must not hold an operator thread (and
# a push, the task's capacity slot) forever.
FETCH_DEADLINE = 900.0

_ASKPASS = """#!/bin/sh
case "$1" in
  Username*) printf '%s' "$REACTOR_GIT_USERNAME" ;;
  *) printf '%s' "$REACTOR_GIT_PASSWORD" ;;
esac
"""


@dataclass(repr=False)
class GitCredentials:
    username: str | None = None
    password: str | None = None
    ssh_private_key: str | None = None

    def __repr__(self) -> str:  # never show the secret
        return "GitCredentials(<redacted>)"

    @contextmanager
    def environment(self) -> Iterator[GitAuth]:
        """What makes git use these credentials: environment variables, and the file
        descriptors git must inherit (pass them as ``pass_fds``); all gone afterwards."""
        auth = GitAuth()
        with contextlib.ExitStack() as stack:
            if self.password is not None:
                # In the operator's private temp dir, which no cell can read.
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="reactor-git-", dir=private.temp_dir()))
                askpass = Path(tmp) / "askpass"  # a script reading the environment: no secret in it
                askpass.write_text(_ASKPASS)
                askpass.chmod(stat.S_IRWXU)
                auth.env.update(GIT_ASKPASS=str(askpass), REACTOR_GIT_USERNAME=self.username or "git",
                                REACTOR_GIT_PASSWORD=self.password)
            if self.ssh_private_key is not None:
                # Never on disk: a memfd that git hands down to ssh, which opens it as /dev/fd/N
                # (a new open of /proc/<pid>/fd/N needs ptrace rights over git: a cell has none).
                fd = os.memfd_create("reactor-ssh-key", 0)  # no MFD_CLOEXEC: git and ssh inherit it
                stack.callback(os.close, fd)
                os.fchmod(fd, 0o600)  # ssh refuses a key others could read
                key = self.ssh_private_key if self.ssh_private_key.endswith("\n") else self.ssh_private_key + "\n"
                os.write(fd, key.encode())
                auth.fds = (fd,)
                auth.env["GIT_SSH_COMMAND"] = (f"ssh -i /dev/fd/{fd} -o IdentitiesOnly=yes "
                                               "-o StrictHostKeyChecking=accept-new")
            yield auth


@dataclass
class GitAuth:
    env: dict[str, str] = field(default_factory=dict)
    fds: tuple[int, ...] = ()


def mirror_path(root: Path, namespace: str, url: str) -> Path:
    """Where the mirror of ``url`` for ``namespace`` lives under ``root``."""
    digest = hashlib.sha256(f"{namespace}\0{url}".encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")) or "repo"
    return Path(root) / safe_component(namespace) / f"{name}-{digest}.git"


class RepositoryMirrors:
    """Mirrors under ``root``, one per (namespace, URL); ``policy`` judges every URL."""

    def __init__(self, root: Path, policy: RepositoryPolicy):
        self.root = Path(root)
        self.policy = policy

    def path_for(self, namespace: str, url: str) -> Path:
        return mirror_path(self.root, namespace, url)

    def sync(self, namespace: str, url: str, credentials: GitCredentials | None = None,
             until: float | None = None) -> Path:
        """Clone the mirror on first use, otherwise fetch; return its path. Blocking. Raises
        RepositoryRefused for a URL the policy refuses (before git sees it); past
        ``until`` (time.monotonic()) the clone or fetch is killed (GitTimeout).

        Branches are fetched into refs/heads/* (without --prune, so result branches that live
        only here survive); the base branch therefore always names the remote's tip."""
        clone_url = self.policy.clone_url(url)
        until = time.monotonic() + FETCH_DEADLINE if until is None else until
        path = self.path_for(namespace, url)
        creds = credentials or GitCredentials()
        path.parent.mkdir(parents=True, exist_ok=True)
        with creds.environment() as auth, file_lock(path.with_suffix(".lock")):
            try:
                if not (path / "HEAD").exists():
                    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
                    try:
                        git(path.parent, "clone", "--bare", "--quiet", clone_url, str(tmp), env=auth.env,
                            pass_fds=auth.fds, timeout=_left(until))
                        git(tmp, "config", "remote.origin.fetch", "+refs/heads/*:refs/heads/*")
                        RefLedger(tmp).record_all()
                        os.replace(tmp, path)
                    finally:
                        shutil.rmtree(tmp, ignore_errors=True)  # a clone that failed half-way
                else:
                    # Under the repository lock too: fetch must not race a checkout or a result.
                    with repository_lock(path):
                        ledger = RefLedger(path)
                        tampered = ledger.restore_tampered()
                        if tampered:  # before fetching, so the fetch cannot launder a moved ref
                            log.error("mirror %s: refs changed behind Reactor's back, restored: %s",
                                      redact_url(url), "; ".join(tampered))
                        # Judged just now: a file:// path resolves to where it leads today.
                        git(path, "config", "remote.origin.url", clone_url)
                        git(path, "fetch", "--quiet", "origin", env=auth.env, pass_fds=auth.fds,
                            timeout=_left(until))
                        ledger.record_all()
            except GitError as exc:
                raise GitError(exc.args_, exc.returncode, f"cannot fetch {redact_url(url)}: {exc.stderr}") from None
        return path

    def push(self, mirror: Path, branch: str, url: str, credentials: GitCredentials | None = None,
             expected: str | None = None) -> None:
        """Push ``branch`` of the mirror to the repository (no force: never overwrite a
        branch someone else wrote). Refuses (ResultRejected) when any ref of the mirror moved
        behind Reactor's back, or ``branch`` is not at ``expected``."""
        creds = credentials or GitCredentials()
        with creds.environment() as auth, repository_lock(mirror):
            tampered = RefLedger(mirror).restore_tampered()
            if tampered:
                raise ResultRejected("refs of the mirror changed behind Reactor's back; restored: " + "; ".join(tampered))
            if expected is not None and git(mirror, "rev-parse", f"refs/heads/{branch}") != expected:
                raise ResultRejected(f"branch {branch} is not at the tested commit {expected[:12]}")
            git(mirror, "push", "--quiet", "origin", f"refs/heads/{branch}:refs/heads/{branch}", env=auth.env,
                pass_fds=auth.fds, timeout=FETCH_DEADLINE)

    def push_record(self, mirror: Path, commit: str | None, ref: str,
                    credentials: GitCredentials | None = None) -> None:
        """Set ``ref`` (a ref of Reactor's own namespace, refs/reactor/...) in the repository
        to ``commit`` of the mirror, or delete it (``commit`` None). Forced: the ref is
        Reactor's record, never a branch anyone builds on. Deleting a ref that is not there
        is no error."""
        if not ref.startswith("refs/reactor/"):
            raise ValueError(f"{ref}: not a ref of Reactor's namespace")
        creds = credentials or GitCredentials()
        with creds.environment() as auth, repository_lock(mirror):
            if commit is None:
                remote = git(mirror, "ls-remote", "origin", ref, env=auth.env, pass_fds=auth.fds,
                             timeout=FETCH_DEADLINE)
                if remote:
                    git(mirror, "push", "--quiet", "origin", f":{ref}", env=auth.env, pass_fds=auth.fds,
                        timeout=FETCH_DEADLINE)
                git(mirror, "update-ref", "-d", ref, check=False)
            else:
                git(mirror, "push", "--quiet", "--force", "origin", f"{commit}:{ref}", env=auth.env,
                    pass_fds=auth.fds, timeout=FETCH_DEADLINE)

    def fetch_record(self, mirror: Path, ref: str, credentials: GitCredentials | None = None) -> str | None:
        """The commit ``ref`` (refs/reactor/...) names in the repository, fetched into the
        mirror under the same name (objects only: nothing of it is checked out or run
        here); None when the repository has no such ref."""
        if not ref.startswith("refs/reactor/"):
            raise ValueError(f"{ref}: not a ref of Reactor's namespace")
        creds = credentials or GitCredentials()
        with creds.environment() as auth, repository_lock(mirror):
            if not git(mirror, "ls-remote", "origin", ref, env=auth.env, pass_fds=auth.fds, timeout=FETCH_DEADLINE):
                return None
            git(mirror, "-c", "transfer.fsckObjects=true", "fetch", "--quiet", "--no-tags", "--no-write-fetch-head",
                "origin", f"+{ref}:{ref}", env=auth.env, pass_fds=auth.fds, timeout=FETCH_DEADLINE)
            return git(mirror, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False) or None

    def delete_branch(self, mirror: Path, branch: str) -> None:
        with repository_lock(mirror):
            git(mirror, "update-ref", "-d", f"refs/heads/{branch}", check=False)
            RefLedger(mirror).record(f"refs/heads/{branch}", None)


def _left(until: float | None) -> float | None:
    return None if until is None else until - time.monotonic()
