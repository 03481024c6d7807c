"""The base branch a queue advances, by compare-and-swap only.

``LocalBranch``: the branch in the repository that holds the candidates (`reactor run`'s
user repository, a test's origin): `git update-ref <ref> <new> <old>`, which git applies
only while the ref still holds ``old``.
``PushedBranch``: the branch in a remote (the operator's origin, the candidates built in
its mirror): a push of a fast-forward whose lease is the old tip
(`--force-with-lease=<ref>:<old>`), so the remote refuses it if anyone moved the branch;
never a forced rewrite (the new tip always descends from the old one, checked before).
A forge's merge guarded by the PR's head commit is the same operation through its API.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from reactor.forge.types import Forge, ForgeRefused, HeadOutOfDate, NotMergeable, PRState
from reactor.infra.git import GitError, git, git_ok
from reactor.infra.mirrors import GitCredentials
from reactor.infra.worktrees import repository_lock

# The base's fetch and push talk to the tenant's remote, which may never answer: past this
# (seconds) git is killed (GitTimeout) and the round ends; the next one starts over.
GIT_DEADLINE = 300.0


class BaseBranch(Protocol):
    def tip(self) -> str:
        """The branch's current commit, its objects present in the queue's repository."""

    def advance(self, old: str, new: str) -> bool:
        """Move the branch from ``old`` to ``new`` (a descendant) if it still holds ``old``."""


class LocalBranch:
    def __init__(self, repo: Path, branch: str):
        self.repo, self.ref = Path(repo), f"refs/heads/{branch}"

    def tip(self) -> str:
        return git(self.repo, "rev-parse", "--verify", f"{self.ref}^{{commit}}")

    def advance(self, old: str, new: str) -> bool:
        _check_fast_forward(self.repo, old, new)
        with repository_lock(self.repo):
            try:
                git(self.repo, "update-ref", "-m", "reactor merge queue", self.ref, new, old)
            except GitError:
                if self.tip() != old:
                    return False  # someone moved the branch: the swap did not happen
                raise
        return True


class PushedBranch:
    """``remote``: a remote name, URL or path; ``credentials``: for git (askpass or a key
    file), never in argv."""

    def __init__(self, repo: Path, remote: str, branch: str, credentials: GitCredentials | None = None,
                 deadline: float | None = None):
        self.repo, self.remote, self.branch = Path(repo), remote, branch
        self.deadline = GIT_DEADLINE if deadline is None else deadline
        self.credentials = credentials or GitCredentials()
        # Outside refs/heads and refs/tags: a mirror's ref ledger vouches for those only.
        self.tracking = f"refs/reactor/queue-base/{branch}"

    def _url(self) -> str:
        """The remote's URL: git given a remote's name updates the repository's own branches
        from its fetch refspec after a push or fetch (a mirror maps refs/heads/* onto itself),
        behind the mirror's ref ledger; given the URL it touches nothing but ``tracking``."""
        url = git(self.repo, "config", "--get", f"remote.{self.remote}.url", check=False)
        return url or self.remote

    def tip(self) -> str:
        with self.credentials.environment() as auth, repository_lock(self.repo):
            git(self.repo, "fetch", "--quiet", "--no-tags", "--no-write-fetch-head", self._url(),
                f"+refs/heads/{self.branch}:{self.tracking}", env=auth.env, pass_fds=auth.fds, timeout=self.deadline)
        return git(self.repo, "rev-parse", "--verify", f"{self.tracking}^{{commit}}")

    def advance(self, old: str, new: str) -> bool:
        _check_fast_forward(self.repo, old, new)
        ref = f"refs/heads/{self.branch}"
        try:
            with self.credentials.environment() as auth:
                git(self.repo, "push", "--quiet", "--no-verify", f"--force-with-lease={ref}:{old}", self._url(),
                    f"{new}:{ref}", env=auth.env, pass_fds=auth.fds, timeout=self.deadline)
        except GitError as exc:
            if "stale info" in exc.stderr or "rejected" in exc.stderr:
                return False
            raise
        return True


    def push_head(self, branch: str, expected: str, new: str) -> bool:
        """Point ``branch`` (a pull request's head, Reactor's result branch) at ``new`` if it
        still holds ``expected``: a forced push with that lease (``new`` is the result rebased
        onto the base, not a descendant of it)."""
        ref = f"refs/heads/{branch}"
        try:
            with self.credentials.environment() as auth:
                git(self.repo, "push", "--quiet", "--no-verify", f"--force-with-lease={ref}:{expected}", self._url(),
                    f"{new}:{ref}", env=auth.env, pass_fds=auth.fds, timeout=self.deadline)
        except GitError as exc:
            if "stale info" in exc.stderr or "rejected" in exc.stderr:
                return False
            raise
        return True


def _check_fast_forward(repo: Path, old: str, new: str) -> None:
    if not git_ok(repo, "merge-base", "--is-ancestor", old, new):
        raise ValueError(f"{new[:12]} does not descend from {old[:12]}: the queue never rewrites a base branch")


class PullRequestMerge(Protocol):
    async def merge(self, entry_id: str, number: int, result: str, old: str, candidate: str) -> str | None:
        """Land the tested ``candidate`` (a child of ``old``, the base tip) through pull request
        ``number`` of the result ``result``: None when the base is ``candidate`` now, else why
        the forge refused (the entry is then tested again, never merged blindly)."""


class ForgeMerge:
    """The base advanced through a forge's merge of a result's pull request, so the pull
    request reads as merged. A compare-and-swap too: the pull request's head is pointed at
    the tested candidate (a push whose lease is the head the forge showed: the result itself,
    or an earlier candidate of the same entry), then merged fast-forward only, guarded by
    that head (`head_commit_id`): the forge refuses when the head moved (409) or the base is
    not the candidate's parent any more (the fast-forward fails), and the base becomes the
    tested commit exactly or stays as it was.

    ``forge_for(entry_id)``: the forge client with the entry's token (closed after use)."""

    SETTLE_SECONDS = 20.0  # the forge takes a push in asynchronously (hooks, a queue)

    def __init__(self, branch: PushedBranch, forge_for: Callable[[str], Awaitable[Forge]]):
        self.branch, self.forge_for = branch, forge_for

    async def merge(self, entry_id: str, number: int, result: str, old: str, candidate: str) -> str | None:
        forge = await self.forge_for(entry_id)
        try:
            pr = await forge.get_pull_request(number)
            if pr.state is not PRState.OPEN:
                return f"pull request #{number} is {pr.state.value}"
            if pr.head_commit != candidate:
                if pr.head_commit != result and entry_id not in carried_ids(self.branch.repo, pr.head_commit):
                    return (f"the head of pull request #{number} moved to {pr.head_commit[:12]}, which is not the "
                            "result the queue tested")
                if not await asyncio.to_thread(self.branch.push_head, pr.head_branch, pr.head_commit, candidate):
                    return f"the head of pull request #{number} moved while the tested candidate was pushed to it"
            deadline = time.monotonic() + self.SETTLE_SECONDS
            while True:
                try:
                    await forge.merge_pull_request(number, candidate, method="fast-forward-only")
                    return None
                except (HeadOutOfDate, NotMergeable) as exc:
                    # Right after the push the forge may still show the old head, or still be
                    # checking mergeability: wait a little for it, not for a real refusal.
                    if time.monotonic() > deadline:
                        return f"the forge refused the merge of #{number}: {exc}"
                    await asyncio.sleep(0.5)
                except ForgeRefused as exc:  # e.g. no fast-forward-only merge on this forge
                    return f"the forge refused the merge of #{number}: {exc}"
        finally:
            await forge.aclose()


def carried_ids(repo: Path, commit: str) -> list[str]:
    """The queue entries a commit names in its trailer (an earlier candidate of Reactor's)."""
    from reactor.mergequeue.candidates import TRAILER
    out = git(repo, "log", "-1", f"--format=%(trailers:key={TRAILER},valueonly,separator=%x20)", commit, check=False)
    return out.split()
