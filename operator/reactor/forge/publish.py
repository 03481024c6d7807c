"""Opening (or updating) the one pull request of a task: idempotent under any crash.

The order is what makes it safe to repeat from the top at any point:
  1. look it up by head and base (any state): a PR from an earlier try is found, not duplicated
     (a stacked PR is also looked up under the other bases it may have had: its parent's
     branch, or the base it was retargeted to);
  2. none: create it; the forge's "already exists" (a crash after the forge created it but
     before we heard) is success: look it up again;
  3. found and open with another title, body or base (the task committed again; its parent
     integrated meanwhile): update it;
  4. the commit status reactor/tcr = success on the head commit (setting it twice is harmless).
A merged or closed PR is reported as it is, never reopened or duplicated.

The forge does not serialise creates (Gitea 1.26 made three PRs of three simultaneous
creates): one publisher per task at a time is the caller's to ensure (in a fleet, the
replica holding the task's claim; ``guard`` re-checks it before each change on the forge).
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from reactor.forge.body import PullRequestFacts, render_body, status_description
from reactor.forge.types import AlreadyExists, Forge, ForgeKind, ForgeUnavailable, PRState, PullRequest

DRAFT_PREFIX = "WIP: "  # Gitea's way of marking a draft


class Action(str, enum.Enum):
    CREATED = "Created"  # this task's PR came into being (now, or in a try that crashed)
    UPDATED = "Updated"  # an existing PR got the task's new commit's body
    UNCHANGED = "Unchanged"  # merged or closed: left as it is


@dataclass(frozen=True)
class Published:
    pull_request: PullRequest
    action: Action


StepHook = Callable[[str], None]  # called with each step's name before it runs (a test's crash point)
Guard = Callable[[], Awaitable[None]]  # awaited before each change on the forge; raises to stop


def _nothing(step: str) -> None:
    pass


async def _go_on() -> None:
    pass


async def publish_pull_request(forge: Forge, facts: PullRequestFacts, draft: bool = False,
                               on_step: StepHook = _nothing, other_bases: tuple[str, ...] = (),
                               guard: Guard = _go_on) -> Published:
    """``facts.base``: the base the PR must have now; ``other_bases``: bases it may have been
    opened with (a stacked PR's parent branch, or its final base)."""
    title = facts.title
    if draft and forge.kind is ForgeKind.GITEA:
        title = DRAFT_PREFIX + title
    body = render_body(facts)
    on_step("find")
    pr = await forge.find_pull_request(facts.branch, facts.base)
    for base in other_bases:
        if pr is not None:
            break
        if base != facts.base:
            pr = await forge.find_pull_request(facts.branch, base)
    action = Action.CREATED
    if pr is None:
        on_step("create")
        await guard()
        try:
            pr = await forge.create_pull_request(facts.branch, facts.base, facts.title, body, draft)
        except AlreadyExists:
            pr = await forge.find_pull_request(facts.branch, facts.base)
            if pr is None:  # the forge contradicts itself: try again later
                raise ForgeUnavailable(f"the forge says a pull request from {facts.branch} exists but none is found")
    if pr.state is not PRState.OPEN:
        action = Action.UNCHANGED
    elif pr.body != body or pr.title != title or pr.base_branch != facts.base:
        on_step("update")
        await guard()
        had_our_commit = facts.commit in pr.body
        pr = await forge.update_pull_request(pr.number, title=title, body=body,
                                             base=facts.base if pr.base_branch != facts.base else None)
        action = Action.CREATED if had_our_commit else Action.UPDATED
    on_step("status")
    await forge.set_commit_status(facts.commit, "success", status_description(facts), target_url=None)
    on_step("done")
    if pr.head_commit != facts.commit and pr.state is PRState.OPEN:
        # The forge learns of a push asynchronously; what we pushed is the head.
        pr = PullRequest(**{**pr.__dict__, "head_commit": facts.commit})
    return Published(pr, action)
