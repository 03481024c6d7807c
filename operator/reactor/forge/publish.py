"""Opening (or updating) the one pull request of a task: idempotent under any crash.

The order is what makes it safe to repeat from the top at any point:
  1. look it up by head and base (any state): a PR from an earlier try is found, not duplicated;
  2. none: create it; the forge's "already exists" (another replica, or a crash after the
     forge created it but before we heard) is success: look it up again;
  3. found and open with another title or body (the task committed again): update it;
  4. the commit status reactor/tcr = success on the head commit (setting it twice is harmless).
A merged or closed PR is reported as it is, never reopened or duplicated.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
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


def _nothing(step: str) -> None:
    pass


async def publish_pull_request(forge: Forge, facts: PullRequestFacts, draft: bool = False,
                               on_step: StepHook = _nothing) -> Published:
    title = facts.title
    if draft and forge.kind is ForgeKind.GITEA:
        title = DRAFT_PREFIX + title
    body = render_body(facts)
    on_step("find")
    pr = await forge.find_pull_request(facts.branch, facts.base)
    action = Action.CREATED
    if pr is None:
        on_step("create")
        try:
            pr = await forge.create_pull_request(facts.branch, facts.base, facts.title, body, draft)
        except AlreadyExists:
            pr = await forge.find_pull_request(facts.branch, facts.base)
            if pr is None:  # the forge contradicts itself: try again later
                raise ForgeUnavailable(f"the forge says a pull request from {facts.branch} exists but none is found")
    if pr.state is not PRState.OPEN:
        action = Action.UNCHANGED
    elif pr.body != body or pr.title != title:
        on_step("update")
        had_our_commit = facts.commit in pr.body
        pr = await forge.update_pull_request(pr.number, title=title, body=body)
        action = Action.CREATED if had_our_commit else Action.UPDATED
    on_step("status")
    await forge.set_commit_status(facts.commit, "success", status_description(facts), target_url=None)
    on_step("done")
    if pr.head_commit != facts.commit and pr.state is PRState.OPEN:
        # The forge learns of a push asynchronously; what we pushed is the head.
        pr = PullRequest(**{**pr.__dict__, "head_commit": facts.commit})
    return Published(pr, action)
