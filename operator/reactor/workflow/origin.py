"""The remote side of a task's repository.

`reactor run` has none: the user's repository is the source and the result branch stays
in it. The operator fetches a mirror of the task's repository before the task
(Bootstrapping) and pushes the result branch from it (Pushing)."""

from __future__ import annotations

import asyncio
from typing import Protocol

from reactor.errors import ReactorError
from reactor.infra.git import GitError, git
from reactor.infra.mirrors import FETCH_DEADLINE, GitCredentials, RepositoryMirrors, redact_url


class FetchFailed(ReactorError):
    """The repository could not be fetched (it does not exist, no access, no network)."""


class PushFailed(ReactorError):
    """The result branch could not be pushed (refused, no access, no network)."""


class Origin(Protocol):
    pushes: bool  # False: fetch only (spec.repository.push: false)

    def describe(self) -> str:
        """Where the repository comes from, fit for status messages (no credentials)."""

    async def fetch(self, until: float | None = None) -> None:
        """Bring the task's local repository up to date, by ``until`` (time.monotonic())
        if given. Raises FetchFailed, RepositoryRefused or ConfigurationError (e.g. a
        credentials Secret that does not exist)."""

    async def push(self, branch: str, commit: str) -> None:
        """Publish ``branch`` (holding ``commit``). Raises PushFailed."""


class MirrorOrigin:
    """A repository by URL: a bare mirror in the work dir, fetched before each task, the
    result branch pushed from it (credentials never in argv, URLs or logs). The mirror is
    the namespace's own. Raises RepositoryRefused for a URL the mirrors' policy refuses."""

    def __init__(self, mirrors: RepositoryMirrors, namespace: str, url: str, credentials: GitCredentials | None = None,
                 pushes: bool = True):
        self.mirrors, self.namespace, self.url, self.credentials, self.pushes = mirrors, namespace, url, credentials, pushes
        mirrors.policy.clone_url(url)  # refused before anything else happens
        self.path = mirrors.path_for(namespace, url)

    def describe(self) -> str:
        return redact_url(self.url)

    async def fetch(self, until: float | None = None) -> None:
        try:
            await asyncio.to_thread(self.mirrors.sync, self.namespace, self.url, self.credentials, until)
        except GitError as exc:
            raise FetchFailed(redact_url(str(exc))) from None

    async def push(self, branch: str, commit: str) -> None:
        """Push ``branch`` if the repository does not hold ``commit`` there already (a push
        resumed after an operator restart may have landed before it): pushed at most once."""
        remote = await asyncio.to_thread(self._remote_head, branch)
        if remote == commit:
            return
        if remote:
            raise PushFailed(f"branch {branch} already exists in {self.describe()} at {remote[:12]}; "
                             "nothing pushed (choose another resultBranch)")
        # Push what was tested: the branch must still hold the commit made after the tests
        # (the cell's server still runs, and anything it left behind could move the branch).
        head = await asyncio.to_thread(git, self.path, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}",
                                       check=False)
        if head != commit:
            raise PushFailed(f"branch {branch} no longer holds the tested commit {commit[:12]} (it holds "
                             f"{head[:12] or 'nothing'}); nothing pushed")
        try:
            await asyncio.to_thread(self.mirrors.push, self.path, branch, self.url, self.credentials)
        except GitError as exc:
            raise PushFailed(redact_url(str(exc))) from None
        # The repository has it now. Removed here when no worktree holds it (a resumed push);
        # otherwise the teardown removes it with the worktree.
        await asyncio.to_thread(self.mirrors.delete_branch, self.path, branch)

    def _remote_head(self, branch: str) -> str:
        with (self.credentials or GitCredentials()).environment() as auth:
            try:
                out = git(self.path, "ls-remote", "origin", f"refs/heads/{branch}", env=auth.env, pass_fds=auth.fds,
                          timeout=FETCH_DEADLINE)
            except GitError as exc:
                raise PushFailed(f"cannot reach {self.describe()}: {redact_url(exc.stderr)}") from None
        return out.split()[0] if out else ""
