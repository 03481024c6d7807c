"""The remote side of a task's repository.

`reactor run` has none: the user's repository is the source and the result branch stays
in it. The operator fetches a mirror of the task's repository before the task
(Bootstrapping) and pushes the result branch from it (Pushing).

A fleet's replica also records each green commit in the repository under a ref of Reactor's
own namespace, ``refs/reactor/green/<task uid>``, so that the replica adopting the task after
this one is lost finds it (its mirror lives in this replica's volume); see
docs/architecture.md, "Many replicas"."""

from __future__ import annotations

import asyncio
from typing import Protocol

from reactor.errors import ReactorError
from reactor.infra.git import GitError, git, git_ok
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

    async def push(self, branch: str, commit: str, replaces: str | None = None) -> None:
        """Publish ``branch`` (holding ``commit``; replacing the task's own earlier result
        ``replaces`` there, if given). Raises PushFailed."""

    async def record_green(self, commit: str) -> None:
        """``commit`` passed the tests (it is in the local repository): keep it where whoever
        takes the task over finds it, if this origin keeps such records. Raises on failure
        (the caller only warns: the record is a help, not the result)."""


class MirrorOrigin:
    """A repository by URL: a bare mirror in the work dir, fetched before each task, the
    result branch pushed from it (credentials never in argv, URLs or logs). The mirror is
    the namespace's own. Raises RepositoryRefused for a URL the mirrors' policy refuses."""

    def __init__(self, mirrors: RepositoryMirrors, namespace: str, url: str, credentials: GitCredentials | None = None,
                 pushes: bool = True, green_ref: str | None = None):
        self.mirrors, self.namespace, self.url, self.credentials, self.pushes = mirrors, namespace, url, credentials, pushes
        mirrors.policy.clone_url(url)  # refused before anything else happens
        self.path = mirrors.path_for(namespace, url)
        # Where the task's green commit is recorded in the repository (a fleet:
        # refs/reactor/green/<uid>); None: not recorded (one replica: its mirror keeps it).
        self.green_ref = green_ref
        self.green_known = False  # this run recorded or found one (so it is deleted at the end)

    def describe(self) -> str:
        return redact_url(self.url)

    async def fetch(self, until: float | None = None) -> None:
        try:
            await asyncio.to_thread(self.mirrors.sync, self.namespace, self.url, self.credentials, until)
        except GitError as exc:
            raise FetchFailed(redact_url(str(exc))) from None

    async def push(self, branch: str, commit: str, replaces: str | None = None) -> None:
        """Push ``branch`` if the repository does not hold ``commit`` there already (a push
        resumed after an operator restart may have landed before it): pushed at most once.
        ``replaces``: the task's own earlier result, which the branch may hold and this
        commit then replaces (leased: only if the branch still holds exactly that)."""
        remote = await asyncio.to_thread(self._remote_head, branch)
        if remote == commit:
            return
        if remote and remote != replaces:
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
            await asyncio.to_thread(self.mirrors.push, self.path, branch, self.url, self.credentials,
                                    lease=remote or None)
        except GitError as exc:
            raise PushFailed(redact_url(str(exc))) from None
        # The repository has it now. Removed here when no worktree holds it (a resumed push);
        # otherwise the teardown removes it with the worktree.
        await asyncio.to_thread(self.mirrors.delete_branch, self.path, branch)

    async def record_green(self, commit: str) -> None:
        if self.green_ref is None or not self.pushes:
            return
        self.green_known = True
        await asyncio.to_thread(self.mirrors.push_record, self.path, commit, self.green_ref, self.credentials)

    async def find_green(self, start: str) -> str | None:
        """The green commit a lost run of this task recorded, if there is one that descends
        from ``start`` (the commit that run started from, as its status says), fetched into
        the mirror. Objects only: the commit is untrusted (a cell made it, and anyone who may
        push to the repository may have moved the ref); it is only ever laid into a new
        cell's checkout and tested again there. None: nothing usable is recorded."""
        if self.green_ref is None:
            return None
        await self.fetch()  # the mirror exists and holds the start commit's history
        green = await asyncio.to_thread(self.mirrors.fetch_record, self.path, self.green_ref, self.credentials)
        if green is None:
            return None
        self.green_known = True  # found: deleted with the task's end whatever becomes of it
        if green == start or not await asyncio.to_thread(
                git_ok, self.path, "merge-base", "--is-ancestor", start, green):
            return None
        return green

    async def forget_green(self) -> None:
        """The task ended: its record goes (in the repository and the mirror)."""
        if self.green_ref is None or not self.green_known:
            return
        await asyncio.to_thread(self.mirrors.push_record, self.path, None, self.green_ref, self.credentials)
        self.green_known = False

    async def head(self, branch: str) -> str:
        """The commit ``branch`` holds in the repository ("" when it has no such branch)."""
        return await asyncio.to_thread(self._remote_head, branch)

    def _remote_head(self, branch: str) -> str:
        with (self.credentials or GitCredentials()).environment() as auth:
            try:
                out = git(self.path, "ls-remote", "origin", f"refs/heads/{branch}", env=auth.env, pass_fds=auth.fds,
                          timeout=FETCH_DEADLINE)
            except GitError as exc:
                raise PushFailed(f"cannot reach {self.describe()}: {redact_url(exc.stderr)}") from None
        return out.split()[0] if out else ""
