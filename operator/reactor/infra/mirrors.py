"""Repository mirrors for the operator: one bare clone per repository URL in the work dir,
fetched before each task; worktrees are cut from it and result branches pushed from it.

Credentials never appear in argv, URLs or logs: https passwords reach git through an
askpass script reading environment variables, ssh keys through a 0600 key file named in
GIT_SSH_COMMAND.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from reactor.infra import private
from reactor.infra.git import GitError, git
from reactor.infra.refledger import RefLedger
from reactor.infra.worktrees import ResultRejected, file_lock, repository_lock

log = logging.getLogger(__name__)

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
    def environment(self) -> Iterator[dict[str, str]]:
        """Environment variables that make git use these credentials; files removed afterwards.
        The files live in the operator's private temp dir, which no cell can read."""
        env: dict[str, str] = {}
        with tempfile.TemporaryDirectory(prefix="reactor-git-", dir=private.temp_dir()) as tmp:
            if self.password is not None:
                askpass = Path(tmp) / "askpass"
                askpass.write_text(_ASKPASS)
                askpass.chmod(stat.S_IRWXU)
                env.update(GIT_ASKPASS=str(askpass), REACTOR_GIT_USERNAME=self.username or "git",
                           REACTOR_GIT_PASSWORD=self.password)
            if self.ssh_private_key is not None:
                key = Path(tmp) / "id"
                key.touch(mode=0o600)
                key.write_text(self.ssh_private_key if self.ssh_private_key.endswith("\n") else self.ssh_private_key + "\n")
                env["GIT_SSH_COMMAND"] = f"ssh -i {key} -o IdentitiesOnly=yes -o StrictHostKeyChecking=accept-new"
            yield env


def redact_url(url: str) -> str:
    """A URL fit for logs and messages: any user:password@ part removed."""
    return re.sub(r"://[^/@]*@", "://", url)


class RepositoryMirrors:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path_for(self, url: str) -> Path:
        digest = hashlib.sha256(url.encode()).hexdigest()[:12]
        name = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")) or "repo"
        return self.root / f"{name}-{digest}.git"

    def sync(self, url: str, credentials: GitCredentials | None = None) -> Path:
        """Clone the mirror on first use, otherwise fetch; return its path. Blocking.

        Branches are fetched into refs/heads/* (without --prune, so result branches that live
        only here survive); the base branch therefore always names the remote's tip."""
        path = self.path_for(url)
        creds = credentials or GitCredentials()
        path.parent.mkdir(parents=True, exist_ok=True)
        with creds.environment() as env, file_lock(path.with_suffix(".lock")):
            try:
                if not (path / "HEAD").exists():
                    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
                    git(path.parent, "clone", "--bare", "--quiet", url, str(tmp), env=env)
                    git(tmp, "config", "remote.origin.fetch", "+refs/heads/*:refs/heads/*")
                    RefLedger(tmp).record_all()
                    os.replace(tmp, path)
                else:
                    # Under the repository lock too: fetch must not race a checkout or a result.
                    with repository_lock(path):
                        ledger = RefLedger(path)
                        tampered = ledger.restore_tampered()
                        if tampered:  # before fetching, so the fetch cannot launder a moved ref
                            log.error("mirror %s: refs changed behind Reactor's back, restored: %s",
                                      redact_url(url), "; ".join(tampered))
                        git(path, "fetch", "--quiet", "origin", env=env)
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
        with creds.environment() as env, repository_lock(mirror):
            tampered = RefLedger(mirror).restore_tampered()
            if tampered:
                raise ResultRejected("refs of the mirror changed behind Reactor's back; restored: " + "; ".join(tampered))
            if expected is not None and git(mirror, "rev-parse", f"refs/heads/{branch}") != expected:
                raise ResultRejected(f"branch {branch} is not at the tested commit {expected[:12]}")
            git(mirror, "push", "--quiet", "origin", f"refs/heads/{branch}:refs/heads/{branch}", env=env)

    def delete_branch(self, mirror: Path, branch: str) -> None:
        with repository_lock(mirror):
            git(mirror, "update-ref", "-d", f"refs/heads/{branch}", check=False)
            RefLedger(mirror).record(f"refs/heads/{branch}", None)
