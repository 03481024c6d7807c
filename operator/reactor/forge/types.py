"""What every forge adapter speaks: a pull request, the errors, the adapter interface."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from reactor.errors import ReactorError

STATUS_CONTEXT = "reactor/tcr"  # the commit status branch protection can require


class PRState(str, enum.Enum):
    OPEN = "open"
    CLOSED = "closed"  # closed without merging
    MERGED = "merged"


class ForgeKind(str, enum.Enum):
    GITEA = "gitea"  # Gitea and Forgejo: the same API
    GITHUB = "github"


@dataclass(frozen=True)
class PullRequest:
    number: int
    url: str  # the page people open
    head_branch: str
    head_commit: str
    base_branch: str
    state: PRState
    title: str = ""
    body: str = ""
    draft: bool = False


class ForgeError(ReactorError):
    """A forge call that did not do what was asked."""


class ForgeUnavailable(ForgeError):
    """The forge could not be reached or answered 5xx/429: worth trying again later."""


class ForgeRefused(ForgeError):
    """The forge said no (bad token, no such repository, validation): trying again will not help
    until someone changes something."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class AlreadyExists(ForgeRefused):
    """A pull request for this head and base exists already (the idempotency answer)."""


class HeadOutOfDate(ForgeRefused):
    """A merge guarded by head commit found another head (a compare-and-swap that lost)."""


class NotMergeable(ForgeRefused):
    """The forge refuses the merge now (required checks, conflicts, still computing)."""


class Forge(Protocol):
    """One repository on one forge, as the operator uses it. Every method raises
    ForgeUnavailable (try later) or ForgeRefused (will not work as is)."""

    kind: ForgeKind
    calls: int  # API requests made, for the figures

    async def find_pull_request(self, head: str, base: str) -> PullRequest | None:
        """The pull request from branch ``head`` into ``base``, in any state, or None."""

    async def create_pull_request(self, head: str, base: str, title: str, body: str, draft: bool) -> PullRequest:
        """Raises AlreadyExists when one exists for this head and base."""

    async def update_pull_request(self, number: int, title: str | None = None, body: str | None = None,
                                  base: str | None = None) -> PullRequest:
        """Change what is given; ``base`` retargets the pull request (stacked PRs)."""

    async def get_pull_request(self, number: int) -> PullRequest:
        ...

    async def set_commit_status(self, commit: str, state: str, description: str, target_url: str | None = None,
                                context: str = STATUS_CONTEXT) -> None:
        """state: pending | success | failure | error."""

    async def merge_pull_request(self, number: int, head_commit: str, method: str = "merge") -> None:
        """Merge only if the pull request's head is still ``head_commit`` (HeadOutOfDate otherwise;
        NotMergeable when checks or conflicts stop it). For the merge queue."""

    async def aclose(self) -> None:
        ...
